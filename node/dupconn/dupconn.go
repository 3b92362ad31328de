// Package dupconn closes redundant connections to a peer.
//
// libp2p keeps every connection it makes. When two peers dial each other
// at once, or a QUIC dial is slow enough that the dial ranker also tries
// TCP, both connections stay open for good: go-libp2p never closes a
// redundant one. Each holds its goroutines, buffers and, over TCP, a file
// descriptor. In a swarm of 50 processes started together a worker held
// 68 connections to its 49 peers.
//
// Both ends must not close different connections of a pair, or the peers
// end up with none; so only the end with the lower peer ID closes, and
// the other leaves its duplicates to it. That end keeps the connection
// that carries the most streams it must not break (a query in flight,
// gossipsub's), then a QUIC one over TCP (what the dial ranker prefers),
// then the newer (a restarted peer is on its newest). It closes another
// only when every stream on it belongs to a protocol that reopens its
// stream on the kept connection (the DHT, identify, ping) and the kept
// connection has just answered a ping.
//
// Gossipsub's streams are not expendable: a gossipsub whose outbound
// stream breaks while its peer stays connected opens a new one, but
// forgets the peer's subscriptions, which the peer does not send again
// (go-libp2p-pubsub v0.19); the peer would no longer be sent the topic's
// messages.
package dupconn

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

var log = logging.Logger("mtor/dupconn")

// Defaults.
const (
	// DefaultInterval is how often the connections are looked at.
	DefaultInterval = 15 * time.Second
	// DefaultGrace is how long a connection lives before it may be
	// closed as redundant: long enough for identify and for a dial that
	// raced it to settle.
	DefaultGrace = 10 * time.Second
	// DefaultTimeout bounds the ping of the connection kept.
	DefaultTimeout = 2 * time.Second
	// maxPeersPerSweep bounds the pings of one sweep; the rest wait for
	// the next.
	maxPeersPerSweep = 32
)

// Prober checks that conn reaches a live peer (liveness.Probe).
type Prober func(ctx context.Context, conn network.Conn) error

// Pruner closes redundant connections of a host. It is safe for
// concurrent use.
type Pruner struct {
	h          host.Host
	probe      Prober
	expendable []protocol.ID
	interval   time.Duration
	grace      time.Duration
	timeout    time.Duration
	closed     atomic.Int64
}

// Option configures a Pruner.
type Option func(*Pruner)

// WithInterval sets how often Run sweeps.
func WithInterval(d time.Duration) Option {
	return func(p *Pruner) {
		if d > 0 {
			p.interval = d
		}
	}
}

// WithGrace sets the age below which a connection is never closed.
func WithGrace(d time.Duration) Option {
	return func(p *Pruner) {
		if d >= 0 {
			p.grace = d
		}
	}
}

// WithTimeout bounds the ping of the connection kept.
func WithTimeout(d time.Duration) Option {
	return func(p *Pruner) {
		if d > 0 {
			p.timeout = d
		}
	}
}

// WithExpendable adds protocols whose streams may be reset with a
// redundant connection because their owner opens a new stream on another
// connection to the same peer, and loses nothing when it does.
func WithExpendable(ids ...protocol.ID) Option {
	return func(p *Pruner) { p.expendable = append(p.expendable, ids...) }
}

// New is a Pruner of h's connections that pings the connection it keeps
// with probe.
func New(h host.Host, probe Prober, opts ...Option) *Pruner {
	p := &Pruner{h: h, probe: probe, interval: DefaultInterval, grace: DefaultGrace, timeout: DefaultTimeout}
	for _, o := range opts {
		o(p)
	}
	return p
}

// Closed is how many connections the pruner has closed.
func (p *Pruner) Closed() int64 { return p.closed.Load() }

// Run sweeps every interval until ctx ends.
func (p *Pruner) Run(ctx context.Context) {
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.Sweep(ctx)
		}
	}
}

// Sweep closes the redundant connections it may close now and returns
// how many it closed.
func (p *Pruner) Sweep(ctx context.Context) int {
	self := p.h.ID()
	// A relayed connection is no duplicate of a direct one: the direct
	// one is what a hole punch is for, the relayed one its fallback when
	// the NATs' mappings die (node/router), and mtor's relays set no
	// limit that would end it (so it is not Limited). So each peer's
	// direct connections are pruned among themselves, and so are its
	// relayed ones (through one relay or several).
	type path struct {
		peer    peer.ID
		relayed bool
	}
	byPath := map[path][]network.Conn{}
	for _, c := range p.h.Network().Conns() {
		rp := c.RemotePeer()
		// The other end decides; a limited connection ends by its limits.
		if rp <= self || c.IsClosed() || c.Stat().Limited {
			continue
		}
		k := path{rp, relayaddr.IsRelayed(c)}
		byPath[k] = append(byPath[k], c)
	}
	closed, looked := 0, 0
	now := time.Now()
	for k, conns := range byPath {
		rp := k.peer
		if len(conns) < 2 {
			continue
		}
		keep, drop := p.choose(conns, now)
		if len(drop) == 0 {
			p.logKept(rp, conns, now)
			continue
		}
		if looked++; looked > maxPeersPerSweep || ctx.Err() != nil {
			break
		}
		pctx, cancel := context.WithTimeout(ctx, p.timeout)
		err := p.probe(pctx, keep)
		cancel()
		if err != nil {
			// The liveness checker deals with a connection that does
			// not answer; until then the others stay.
			log.Debugw("kept connection did not answer; its duplicates stay", "peer", rp, "err", err)
			continue
		}
		for _, c := range drop {
			// A stream opened on it during the ping keeps it (libp2p
			// opens new streams on the connection with the most); what
			// opens between this look and the close fails over like any
			// stream of a lost connection.
			if c.IsClosed() || p.sticky(c) != 0 {
				continue
			}
			log.Debugw("closing a redundant connection", "peer", rp, "addr", c.RemoteMultiaddr(), "kept", keep.RemoteMultiaddr())
			_ = c.Close()
			closed++
		}
	}
	p.closed.Add(int64(closed))
	return closed
}

// choose picks the connection to keep among conns to one peer and those
// that may be closed now.
func (p *Pruner) choose(conns []network.Conn, now time.Time) (keep network.Conn, drop []network.Conn) {
	busy := make(map[network.Conn]int, len(conns))
	for _, c := range conns {
		busy[c] = p.sticky(c)
	}
	keep = slices.MaxFunc(conns, func(a, b network.Conn) int {
		if d := busy[a] - busy[b]; d != 0 {
			return d
		}
		if qa, qb := isQUIC(a), isQUIC(b); qa != qb {
			if qa {
				return 1
			}
			return -1
		}
		return a.Stat().Opened.Compare(b.Stat().Opened)
	})
	for _, c := range conns {
		if c != keep && busy[c] == 0 && now.Sub(c.Stat().Opened) >= p.grace {
			drop = append(drop, c)
		}
	}
	return keep, drop
}

// logKept tells, at debug level, why a peer's connections past their
// grace all stay: each one's transport and streams (docs/benchmarks.md,
// "Redundant connections": those left are split gossip pairs). A sweep
// finds few such peers, every 15 s, so the words cost nothing to build.
func (p *Pruner) logKept(rp peer.ID, conns []network.Conn, now time.Time) {
	desc := make([]string, 0, len(conns))
	for _, c := range conns {
		if now.Sub(c.Stat().Opened) < p.grace {
			return // a young one may go at the next sweep
		}
		protos := make([]string, 0, len(c.GetStreams()))
		for _, s := range c.GetStreams() {
			protos = append(protos, fmt.Sprintf("%s %s", s.Stat().Direction, s.Protocol()))
		}
		desc = append(desc, fmt.Sprintf("%s %s [%s]", c.ConnState().Transport, c.Stat().Direction, strings.Join(protos, ", ")))
	}
	log.Debugw("redundant connections kept: each carries streams that would break", "peer", rp, "conns", desc)
}

func isQUIC(c network.Conn) bool {
	return strings.HasPrefix(c.ConnState().Transport, "quic")
}

// sticky counts the streams on c that closing it would break: those of
// protocols not named expendable, and those still negotiating theirs.
func (p *Pruner) sticky(c network.Conn) int {
	n := 0
	for _, s := range c.GetStreams() {
		if !slices.Contains(p.expendable, s.Protocol()) {
			n++
		}
	}
	return n
}
