// Package coalesce hands yamux a connection whose writes, when frames come
// faster than the connection takes them, leave together: one noise
// message and one write call for the frames of many streams, and fewer
// reads for the peer. yamux writes every frame by itself (its own write
// coalescing is disabled: libp2p/go-yamux#27), so on a busy connection
// each query's stream cost a syscall and an encryption on each side for
// its opening, its acknowledgement, each batch of events and its close.
//
// No frame waits for company: a write starts a flusher at once when none
// is running, and only the frames written while the flusher is busy go
// out together, in the next call. An idle connection holds no goroutine.
package coalesce

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// MaxPending bounds the bytes a connection holds not yet written: a writer
// blocks beyond it, which keeps yamux's back-pressure on a slow peer, and
// a thousand peers that read nothing hold at most 64 MiB here. It is one
// Noise message's worth: more in one write would gain nothing.
const MaxPending = 64 << 10

// keepBuffer is the largest buffer kept for the next batch: a rare big
// batch is left to the garbage collector rather than held by every idle
// connection.
const keepBuffer = 16 << 10

// closeFlushLimit bounds how long Close waits for the frames still pending
// (yamux's last frames: a GoAway, the last FINs) to be written.
const closeFlushLimit = 250 * time.Millisecond

// ErrClosed is what a Write after Close returns.
var ErrClosed = errors.New("coalesce: connection closed")

// Muxer wraps a stream multiplexer so that every connection it is given
// writes through a coalescing Conn.
func Muxer(m network.Multiplexer) network.Multiplexer { return muxer{m} }

type muxer struct{ network.Multiplexer }

func (m muxer) NewConn(c net.Conn, isServer bool, scope network.PeerScope) (network.MuxedConn, error) {
	return m.Multiplexer.NewConn(New(c), isServer, scope)
}

// Conn is a net.Conn whose writes are queued and written by a flusher
// goroutine; reads, addresses and deadlines are the underlying
// connection's (a write deadline bounds the flusher's writes).
type Conn struct {
	net.Conn

	mu       sync.Mutex
	cond     sync.Cond // a batch taken (room), a flush ended
	pending  []byte    // written by the caller, not yet to the connection
	spare    []byte    // the last batch's buffer, for the next one
	err      error     // the first failed write: every later Write returns it
	closed   bool
	flushing bool // a flusher runs
}

// New wraps c.
func New(c net.Conn) *Conn {
	w := &Conn{Conn: c}
	w.cond.L = &w.mu
	return w
}

// Write queues a copy of p and returns; it blocks only while MaxPending
// bytes are queued. After a failed write of the connection every Write
// returns that error.
func (c *Conn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && !c.closed && len(c.pending) > 0 && len(c.pending)+len(p) > MaxPending {
		c.cond.Wait()
	}
	switch {
	case c.err != nil:
		return 0, c.err
	case c.closed:
		return 0, ErrClosed
	}
	c.pending = append(c.pending, p...)
	if !c.flushing {
		c.flushing = true
		go c.flush()
	}
	return len(p), nil
}

// flush writes what is pending, all of it in one call each time round,
// until nothing is left.
func (c *Conn) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.pending) > 0 && c.err == nil {
		batch := c.pending
		c.pending, c.spare = c.spare[:0], nil
		c.cond.Broadcast() // room for blocked writers
		c.mu.Unlock()
		_, err := c.Conn.Write(batch)
		c.mu.Lock()
		if cap(batch) <= keepBuffer {
			c.spare = batch[:0]
		}
		if err != nil {
			// Nothing written after a lost frame could be read: end the
			// connection, so that its reader stops too.
			c.err, c.pending = err, nil
			_ = c.Conn.Close()
		}
	}
	c.flushing = false
	c.cond.Broadcast()
}

// Close waits for what is pending to be written (at most closeFlushLimit)
// and closes the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.cond.Broadcast() // writers waiting for room give up
	if c.flushing {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(closeFlushLimit))
	}
	for c.flushing {
		c.cond.Wait()
	}
	c.mu.Unlock()
	return c.Conn.Close()
}
