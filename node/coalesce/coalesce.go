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
// out together, in the next call. An idle connection holds no goroutine
// and no buffer.
package coalesce

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// MaxPending bounds the bytes a connection holds queued: a writer blocks
// beyond it, which keeps yamux's back-pressure on a slow peer. With the
// batch being written, a connection holds at most twice this (one frame
// larger than it, at most 64 KiB, goes alone), so a thousand peers that
// read nothing hold at most 64 MiB here; and a full batch fits one Noise
// message (65 519 bytes).
const MaxPending = 32 << 10

// buffers holds the batch buffers of connections that went idle, for the
// next burst of any connection: an idle connection keeps none, and a busy
// one does not grow a new one for every burst.
var buffers = sync.Pool{New: func() any { return new([]byte) }}

// keepBuffer is the largest buffer put back for reuse.
const keepBuffer = 2 * MaxPending

func getBuffer() []byte { return (*buffers.Get().(*[]byte))[:0] }

func putBuffer(b []byte) {
	if b != nil && cap(b) <= keepBuffer {
		buffers.Put(&b)
	}
}

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
// goroutine; reads and addresses are the underlying connection's. A write
// deadline applies to the frames queued while it is set: a batch is
// written under the deadline of its oldest frame, so that a caller that
// keeps writing (and moving its deadline on) cannot keep a stuck write
// alive. A deadline already past does not interrupt a write under way:
// yamux stops a connection by closing it, not by such a deadline.
type Conn struct {
	net.Conn

	mu       sync.Mutex
	cond     sync.Cond // a batch taken (room), a flush ended
	pending  []byte    // written by the caller, not yet to the connection
	spare    []byte    // the last batch's buffer, for the next batch while busy
	deadline time.Time // the write deadline set last
	oldest   time.Time // the deadline in force when pending's first frame came
	applied  time.Time // the write deadline the underlying connection has
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
	case len(p) == 0:
		return 0, nil
	}
	if len(c.pending) == 0 {
		c.oldest = c.deadline
		if c.pending == nil {
			c.pending = getBuffer()
		}
	}
	c.pending = append(c.pending, p...)
	if !c.flushing {
		c.flushing = true
		go c.flush()
	}
	return len(p), nil
}

// SetWriteDeadline sets the deadline of the frames written from now on.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return nil
}

// SetDeadline sets the read deadline of the connection and the write
// deadline of the frames written from now on.
func (c *Conn) SetDeadline(t time.Time) error {
	_ = c.SetWriteDeadline(t)
	return c.Conn.SetReadDeadline(t)
}

// flush writes what is pending, all of it in one call each time round,
// until nothing is left.
func (c *Conn) flush() {
	c.mu.Lock()
	var err error
	for len(c.pending) > 0 {
		batch, by := c.pending, c.oldest
		c.pending, c.spare = c.spare[:0], nil
		c.oldest = c.deadline
		c.cond.Broadcast()                     // room for blocked writers
		if !by.Equal(c.applied) && !c.closed { // Close set its own
			c.applied = by
			if err = c.Conn.SetWriteDeadline(by); err != nil {
				break
			}
		}
		c.mu.Unlock()
		_, err = c.Conn.Write(batch)
		c.mu.Lock()
		c.spare = batch[:0]
		if err != nil {
			break
		}
	}
	if err != nil && c.err == nil {
		c.err = err
	}
	failed := err != nil
	if failed || len(c.pending) == 0 {
		putBuffer(c.pending)
		c.pending = nil
	}
	putBuffer(c.spare) // an idle connection holds no buffer
	c.spare = nil
	c.flushing = false
	c.cond.Broadcast()
	c.mu.Unlock()
	if failed {
		// Nothing written after a lost frame could be read: end the
		// connection, so that its reader stops too.
		_ = c.Conn.Close()
	}
}

// Close waits for what is pending to be written, for at most
// closeFlushLimit, and closes the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	c.closed = true
	c.cond.Broadcast() // writers waiting for room give up
	if c.flushing {
		c.applied = time.Now().Add(closeFlushLimit)
		_ = c.Conn.SetWriteDeadline(c.applied)
		// A connection that ignores deadlines is closed all the same.
		stop := time.AfterFunc(closeFlushLimit, func() { _ = c.Conn.Close() })
		defer stop.Stop()
	}
	for c.flushing {
		c.cond.Wait()
	}
	c.mu.Unlock()
	return c.Conn.Close()
}
