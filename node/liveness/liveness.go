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
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"
	mss "github.com/multiformats/go-multistream"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

var log = logging.Logger("mtor/liveness")

// Defaults.
const (
	// DefaultTimeout bounds a probe's negotiation of the protocol, a
	// round trip: a live peer on the far side of the world answers in
	// well under a second. The echo may get more (echoDeadline).
	DefaultTimeout = 2 * time.Second
	// maxProbes bounds probes running at once.
	maxProbes = 32
	pingSize  = 32
)

// Probe sends one ping over conn itself (not over whichever connection
// the host would pick) and waits for its echo, within ctx.
func Probe(ctx context.Context, conn network.Conn) error { return probe(ctx, conn, 0) }

// probe is Probe with the protocol's negotiation bounded by base (0: by
// ctx alone) and the echo given what is left of base or twice the time
// the negotiation took, whichever ends later (echoDeadline), within ctx.
func probe(ctx context.Context, conn network.Conn, base time.Duration) error {
	start := time.Now()
	octx := ctx
	if base > 0 {
		// The stream's opening is part of the negotiation: a frozen
		// peer's muxer may never let it open.
		var cancel context.CancelFunc
		octx, cancel = context.WithDeadline(ctx, start.Add(base))
		defer cancel()
	}
	// A relayed connection with limits (another swarm's relay) is alive
	// too: probe it rather than take it for dead.
	s, err := conn.NewStream(network.WithAllowLimitedConn(octx, "liveness"))
	if err != nil {
		return fmt.Errorf("open probe stream: %w", err)
	}
	defer s.Reset()
	// The stream's reads heed its deadline, not ctx: ctx's end (a
	// checker closing) ends them too.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	defer stop()
	if base > 0 {
		_ = s.SetDeadline(start.Add(base))
	} else if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	if err := s.SetProtocol(ping.ID); err != nil {
		return fmt.Errorf("probe protocol: %w", err)
	}
	if err := mss.SelectProtoOrFail(ping.ID, s); err != nil {
		return fmt.Errorf("negotiate ping: %w", err)
	}
	if base > 0 {
		// ctx's end, if sooner, resets the stream (above).
		_ = s.SetDeadline(echoDeadline(start, time.Now(), base))
	}
	// The peer chose the protocol: its process answered on conn, whatever
	// comes of the echo.
	out := make([]byte, pingSize)
	_, _ = rand.Read(out)
	if _, err := s.Write(out); err != nil {
		return fmt.Errorf("%w: send ping: %w", ErrNoEcho, err)
	}
	in := make([]byte, pingSize)
	if _, err := io.ReadFull(s, in); err != nil {
		return fmt.Errorf("%w: read pong: %w", ErrNoEcho, err)
	}
	if !bytes.Equal(in, out) {
		return fmt.Errorf("%w: pong differs from ping", ErrNoEcho)
	}
	return nil
}

// echoDeadline is when a probe that began at start and whose negotiation
// ended at negotiated stops waiting for the echo: what is left of base,
// or twice the negotiation's time from its end, whichever is later. The
// negotiation was a round trip of this very path and the echo is one
// more: a path a second long (a satellite link, a far relay) needs more
// than a 2 s base leaves, where a peer's smoothed round trip, one figure
// for all its paths and set by its own pongs, is no measure of it. At
// most 3 × base from start, since the negotiation ends within base.
func echoDeadline(start, negotiated time.Time, base time.Duration) time.Time {
	dl := negotiated.Add(2 * negotiated.Sub(start))
	if left := start.Add(base); left.After(dl) {
		return left
	}
	return dl
}

// ErrNoEcho is a probe the peer negotiated and then did not echo.
var ErrNoEcho = errors.New("ping negotiated, no echo")

// Outcome is what a probe of a connection says of the process at its
// other end (Check).
type Outcome int

const (
	// Unknown: no probe ran, or it says nothing (this node's own limit,
	// the checker closing).
	Unknown Outcome = iota
	// Alive: the process answered on the connection: the echo, its
	// choice of the protocol (ErrNoEcho) or its refusal, or its reset of
	// the probe's stream while the connection stays. A frozen or dead
	// process does none of these. (The checker still closes a connection
	// whose peer does not echo: it is no use for queries either.)
	Alive
	// Dead: nothing answered; the connection is closed.
	Dead
)

func (o Outcome) String() string {
	switch o {
	case Alive:
		return "alive"
	case Dead:
		return "dead"
	}
	return "unknown"
}

// RefusedProtocol reports whether err is a peer's refusal of the
// protocol a stream asked for: its "na" to the negotiation, or its reset
// of a stream opened on what its announced protocols promised (a lazy
// negotiation). Only a live process refuses.
func RefusedProtocol(err error) bool {
	var ns mss.ErrNotSupported[protocol.ID]
	var nss mss.ErrNotSupported[string] // Probe's (ping.ID is untyped)
	var se *network.StreamError
	return errors.As(err, &ns) || errors.As(err, &nss) ||
		errors.As(err, &se) && se.Remote && se.ErrorCode == network.StreamProtocolNegotiationFailed
}

// outcome classifies a probe of conn that ended with err.
func outcome(conn network.Conn, err error) Outcome {
	var se *network.StreamError
	switch {
	case err == nil, errors.Is(err, ErrNoEcho), RefusedProtocol(err):
		return Alive
	case errors.As(err, &se) && se.Remote && !conn.IsClosed():
		// A relay that drops a circuit resets it too, but the relayed
		// connection closes with it.
		return Alive
	case errors.Is(err, network.ErrResourceLimitExceeded):
		return Unknown
	}
	return Dead
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
	running map[network.Conn][]func(Outcome) // probes under way, and who waits on each
	dead    map[network.Conn]time.Time       // closed by us, lately
	// heard: connections whose peer a probe heard lately (Alive), kept
	// after the checker closed them for not echoing, so that a later
	// Check still says who was there.
	heard  map[network.Conn]time.Time
	closed int // connections closed, for tests and logs
}

// deadMemory is how long the checker remembers a connection it closed.
const deadMemory = time.Minute

// Option configures a Checker.
type Option func(*Checker)

// WithTimeout replaces DefaultTimeout.
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
	c := &Checker{h: h, timeout: DefaultTimeout, sem: make(chan struct{}, maxProbes), running: map[network.Conn][]func(Outcome){}, dead: map[network.Conn]time.Time{}, heard: map[network.Conn]time.Time{}}
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
func (c *Checker) Suspect(conn network.Conn) { c.Check(conn, nil) }

// Check is Suspect, and then calls done (if not nil, and never before
// Check returns) with what the probe says of the peer's process: that of
// the probe already under way for conn if one is, Dead for a connection
// already closed, Unknown when no probe can run (the concurrency bound,
// the checker closing).
func (c *Checker) Check(conn network.Conn, done func(Outcome)) {
	tell := func(o Outcome) {
		if done != nil {
			go done(o)
		}
	}
	switch {
	case conn == nil || c.ctx.Err() != nil:
		tell(Unknown)
		return
	case conn.IsClosed():
		c.mu.Lock()
		_, heard := c.heard[conn]
		c.mu.Unlock()
		if heard {
			tell(Alive)
		} else {
			tell(Dead)
		}
		return
	}
	c.mu.Lock()
	if waiting, ok := c.running[conn]; ok {
		if done != nil {
			c.running[conn] = append(waiting, done)
		}
		c.mu.Unlock()
		return
	}
	select {
	case c.sem <- struct{}{}:
	default:
		c.mu.Unlock()
		tell(Unknown)
		return
	}
	c.running[conn] = nil
	if done != nil {
		c.running[conn] = []func(Outcome){done}
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		found := Unknown
		defer func() {
			<-c.sem
			c.mu.Lock()
			waiting := c.running[conn]
			delete(c.running, conn)
			c.mu.Unlock()
			for _, w := range waiting {
				w(found)
			}
			c.wg.Done()
		}()
		base := c.probeTimeout(conn)
		ctx, cancel := context.WithTimeout(c.ctx, 3*base) // echoDeadline's bound
		err := probe(ctx, conn, base)
		cancel()
		if c.ctx.Err() != nil {
			return
		}
		found = outcome(conn, err)
		if found == Alive {
			c.mu.Lock()
			remember(c.heard, conn)
			c.mu.Unlock()
		}
		if err == nil {
			return
		}
		if Refused(err) {
			log.Debugw("probe refused, the connection stays", "peer", conn.RemotePeer(), "addr", addrString(conn.RemoteMultiaddr()), "err", err)
			return
		}
		log.Debugw("closing a connection whose peer does not answer", "peer", conn.RemotePeer(), "addr", addrString(conn.RemoteMultiaddr()), "err", err)
		c.mu.Lock()
		remember(c.dead, conn)
		c.closed++
		c.mu.Unlock()
		_ = conn.Close()
	}()
}

// maxMemory bounds dead and heard: a probe runs in seconds at most,
// 32 at once at most.
const maxMemory = 4096

// remember adds conn to m, first dropping the entries older than
// deadMemory (all of them, past maxMemory).
func remember(m map[network.Conn]time.Time, conn network.Conn) {
	now := time.Now()
	for k, t := range m {
		if now.Sub(t) > deadMemory {
			delete(m, k)
		}
	}
	if len(m) >= maxMemory {
		clear(m)
	}
	m[conn] = now
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

// probeTimeout is the base of a probe of conn (probe): the checker's
// timeout, or less for a peer whose round trips are known to be short: a
// dead connection found sooner moves its queries sooner. Not less for a
// relayed connection: the peer's smoothed round trip is one figure for
// all its paths, and a direct one beside the circuit sets it.
func (c *Checker) probeTimeout(conn network.Conn) time.Duration {
	rtt := c.h.Peerstore().LatencyEWMA(conn.RemotePeer())
	if rtt <= 0 || relayaddr.IsRelayed(conn) {
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
