// Package liveness finds libp2p connections that no longer reach a live
// peer and closes them.
//
// A peer that vanishes without a reset (a SIGKILLed QUIC endpoint, a
// frozen process, a machine whose network dropped) leaves its connections
// open here until an idle timeout, and libp2p keeps choosing them for new
// streams — it prefers the connection with the most streams, which is the
// stale one. A restarted worker (same peer ID, new process) is then
// reached through a connection to its dead predecessor. Closing such a
// connection as soon as it is suspect lets the swarm use the live one,
// and lets the peer table see a peer that is really gone.
package liveness

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"
	mss "github.com/multiformats/go-multistream"
)

var log = logging.Logger("mtor/liveness")

// Defaults.
const (
	// DefaultTimeout bounds one probe: a live peer on the far side of the
	// world answers a ping in well under a second.
	DefaultTimeout = 2 * time.Second
	// maxProbes bounds probes running at once.
	maxProbes = 32
	pingSize  = 32
)

// Probe sends one ping over conn itself (not over whichever connection
// the host would pick) and waits for its echo.
func Probe(ctx context.Context, conn network.Conn) error {
	// A relayed connection with limits (another swarm's relay) is alive
	// too: probe it rather than take it for dead.
	s, err := conn.NewStream(network.WithAllowLimitedConn(ctx, "liveness"))
	if err != nil {
		return fmt.Errorf("open probe stream: %w", err)
	}
	defer s.Reset()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	if err := s.SetProtocol(ping.ID); err != nil {
		return fmt.Errorf("probe protocol: %w", err)
	}
	if err := mss.SelectProtoOrFail(ping.ID, s); err != nil {
		return fmt.Errorf("negotiate ping: %w", err)
	}
	out := make([]byte, pingSize)
	_, _ = rand.Read(out)
	if _, err := s.Write(out); err != nil {
		return fmt.Errorf("send ping: %w", err)
	}
	in := make([]byte, pingSize)
	if _, err := io.ReadFull(s, in); err != nil {
		return fmt.Errorf("read pong: %w", err)
	}
	if !bytes.Equal(in, out) {
		return fmt.Errorf("pong differs from ping")
	}
	return nil
}

// Checker probes suspect connections in the background and closes those
// that fail. It is safe for concurrent use.
type Checker struct {
	h       host.Host
	timeout time.Duration
	sem     chan struct{}
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	mu      sync.Mutex
	running map[network.Conn]bool
	dead    map[network.Conn]time.Time // closed by us, lately
	closed  int                        // connections closed, for tests and logs
}

// deadMemory is how long the checker remembers a connection it closed.
const deadMemory = time.Minute

// Option configures a Checker.
type Option func(*Checker)

// WithTimeout bounds each probe.
func WithTimeout(d time.Duration) Option {
	return func(c *Checker) {
		if d > 0 {
			c.timeout = d
		}
	}
}

// New starts a Checker on h. It also watches h's new connections: when a
// peer connects while older connections to it exist, those are probed,
// since a peer that restarted cannot be on them any more. Close stops it.
func New(h host.Host, opts ...Option) *Checker {
	c := &Checker{h: h, timeout: DefaultTimeout, sem: make(chan struct{}, maxProbes), running: map[network.Conn]bool{}, dead: map[network.Conn]time.Time{}}
	for _, o := range opts {
		o(c)
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	h.Network().Notify(&network.NotifyBundle{ConnectedF: c.connected})
	return c
}

// Close stops the probes and waits for them.
func (c *Checker) Close() {
	c.cancel()
	c.wg.Wait()
}

// Closed is how many connections the checker has closed.
func (c *Checker) Closed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// Dead reports whether the checker closed conn because its peer did not
// answer: the streams that broke with it broke for that reason.
func (c *Checker) Dead(conn network.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.dead[conn]
	return ok
}

func (c *Checker) connected(_ network.Network, conn network.Conn) {
	for _, old := range c.h.Network().ConnsToPeer(conn.RemotePeer()) {
		if old != conn && !old.IsClosed() && old.Stat().Opened.Before(conn.Stat().Opened) {
			c.Suspect(old)
		}
	}
}

// Suspect probes conn in the background and closes it if the peer does
// not answer within the timeout. Repeated calls for a connection already
// being probed, and calls beyond the concurrency bound, are dropped.
func (c *Checker) Suspect(conn network.Conn) {
	if conn == nil || conn.IsClosed() || c.ctx.Err() != nil {
		return
	}
	c.mu.Lock()
	if c.running[conn] {
		c.mu.Unlock()
		return
	}
	select {
	case c.sem <- struct{}{}:
	default:
		c.mu.Unlock()
		return
	}
	c.running[conn] = true
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer func() {
			<-c.sem
			c.mu.Lock()
			delete(c.running, conn)
			c.mu.Unlock()
			c.wg.Done()
		}()
		ctx, cancel := context.WithTimeout(c.ctx, c.probeTimeout(conn))
		err := Probe(ctx, conn)
		cancel()
		if err == nil || c.ctx.Err() != nil {
			return
		}
		if Refused(err) {
			log.Debugw("probe refused, the connection stays", "peer", conn.RemotePeer(), "addr", addrString(conn.RemoteMultiaddr()), "err", err)
			return
		}
		log.Debugw("closing a connection whose peer does not answer", "peer", conn.RemotePeer(), "addr", addrString(conn.RemoteMultiaddr()), "err", err)
		c.mu.Lock()
		now := time.Now()
		for k, t := range c.dead {
			if now.Sub(t) > deadMemory {
				delete(c.dead, k)
			}
		}
		c.dead[conn] = now
		c.closed++
		c.mu.Unlock()
		_ = conn.Close()
	}()
}

// Refused reports whether a probe failed at a resource limit rather than
// for want of an answer: the peer reset the stream (so it is alive on this
// connection; libp2p lets a peer hold 2 inbound pings at once, and a hole
// punch leaves several connections to probe together), or our own limit
// kept the stream from opening. Neither says the connection is dead.
func Refused(err error) bool {
	var se *network.StreamError
	return (errors.As(err, &se) && se.Remote) || errors.Is(err, network.ErrResourceLimitExceeded)
}

// probeTimeout is the timeout, or less for a peer whose round trips are
// known to be short: a probe takes two of them, and a dead connection
// found sooner moves its queries sooner.
func (c *Checker) probeTimeout(conn network.Conn) time.Duration {
	rtt := c.h.Peerstore().LatencyEWMA(conn.RemotePeer())
	if rtt <= 0 {
		return c.timeout
	}
	return min(c.timeout, max(minTimeout, 6*rtt))
}

// minTimeout is the shortest probe timeout, for peers on a LAN: a busy
// but live process still answers a ping well within it.
const minTimeout = time.Second

func addrString(a ma.Multiaddr) string {
	if a == nil {
		return ""
	}
	return a.String()
}
