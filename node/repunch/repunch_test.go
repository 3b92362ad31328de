package repunch

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/internal/relaytest"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

const (
	loopTCP   = "/ip4/127.0.0.1/tcp/0"
	queryID   = protocol.ID("/test/query")
	firstWait = time.Minute
)

// natGater stands in for a NAT in front of the peer: while closed, a's
// dials to the peer's own addresses fail and only its relay reaches it.
type natGater struct {
	peer   atomic.Value // peer.ID
	closed atomic.Bool
}

func (g *natGater) InterceptPeerDial(peer.ID) bool { return true }
func (g *natGater) InterceptAddrDial(p peer.ID, a ma.Multiaddr) bool {
	return !(g.closed.Load() && g.peer.Load() == p && !relayaddr.IsCircuit(a))
}
func (g *natGater) InterceptAccept(network.ConnMultiaddrs) bool { return true }
func (g *natGater) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (g *natGater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }

func newHost(t *testing.T, opts ...libp2p.Option) host.Host {
	t.Helper()
	h, err := libp2p.New(append([]libp2p.Option{libp2p.ListenAddrStrings(loopTCP)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// direct dials b from a directly beside the relayed connection, as a hole
// punch does.
func direct(t *testing.T, a, b host.Host) network.Conn {
	t.Helper()
	a.Peerstore().AddAddrs(b.ID(), b.Addrs(), time.Hour)
	ctx, cancel := context.WithTimeout(network.WithForceDirectDial(t.Context(), "test"), 10*time.Second)
	defer cancel()
	c, err := a.Network().DialPeer(ctx, b.ID())
	if err != nil || relayaddr.IsRelayed(c) {
		t.Fatalf("direct dial: %v %v", c, err)
	}
	return c
}

// inbound records the relayed connections that come in to h.
type inbound struct {
	mu    sync.Mutex
	conns []network.Conn
}

func watchInbound(h host.Host) *inbound {
	in := &inbound{}
	h.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		if c.Stat().Direction == network.DirInbound && relayaddr.IsRelayed(c) {
			in.mu.Lock()
			in.conns = append(in.conns, c)
			in.mu.Unlock()
		}
	}})
	return in
}

func (in *inbound) count() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return len(in.conns)
}

// clock is a settable time for the backoff.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func safe(id protocol.ID) bool { return id == ping.ID || id == identify.ID || id == identify.IDPush }

// TestReplacesTheRelayedConnection: a peer behind a NAT reached through a
// relay and, after a hole punch, directly. When the direct connection
// dies, the end that dialed the circuit closes it a while later and dials
// the peer through the relay again, so that a new circuit comes in to the
// peer (whose libp2p then punches anew); then less often. A query on the
// relayed connection holds the replacement off until it ends. A circuit
// the peer dialed and a direct connection that is still there are left
// alone. (A peer never reached directly: TestNeverDirectIsTriedAgain.)
func TestReplacesTheRelayedConnection(t *testing.T) {
	cases := []struct {
		name     string
		fromPeer bool // the peer dialed the circuit
		keep     bool // the direct connection stays
		query    bool // a query runs on the relayed connection
		replaced bool
	}{
		{name: "after the direct one died", replaced: true},
		{name: "once a query on it ended", query: true, replaced: true},
		{name: "the peer dialed the circuit", fromPeer: true},
		{name: "a direct one still there", keep: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := &natGater{}
			a := newHost(t, libp2p.ConnectionGater(g))
			b := newHost(t)
			g.peer.Store(b.ID())
			b.SetStreamHandler(queryID, func(s network.Stream) {
				buf := make([]byte, 1)
				_, _ = s.Read(buf)
				_ = s.Close()
			})
			clk := &clock{t: time.Unix(1_800_000_000, 0)}
			rp := New(a, WithSafe(safe), WithBackoff(firstWait, 4*firstWait))
			rp.now = clk.now
			rp.fresh = 0 // the circuits are seconds old: TestFreshCircuitIsLeftToItsPunch
			rp.young = 0 // a test's direct connections close at once: see TestDeathInThePunchIsTriedSoon
			rp.Attach()
			t.Cleanup(rp.Close)
			r := relaytest.New(t)
			var rc network.Conn
			if tc.fromPeer {
				relaytest.Reserve(t, a, r)
				relaytest.Dial(t, b, a, r)
				rc = a.Network().ConnsToPeer(b.ID())[0]
			} else {
				relaytest.Reserve(t, b, r)
				rc = relaytest.Dial(t, a, b, r)
			}
			waitStreams(t, rc)
			in := watchInbound(b)
			var q network.Stream
			if tc.query {
				s, err := a.NewStream(t.Context(), b.ID(), queryID)
				if err != nil || s.Conn() != rc {
					t.Fatalf("query stream: %v on %v, want on the relayed connection", err, s)
				}
				q = s
			}
			dc := direct(t, a, b)
			if !tc.keep {
				g.closed.Store(true) // the NAT's mapping dies with it
				_ = dc.Close()
				waitLost(t, rp, b.ID())
			}
			// Before the first wait, nothing.
			clk.add(firstWait - time.Second)
			if n := rp.Sweep(t.Context()); n != 0 {
				t.Fatalf("redialed %d peers before the first wait, want 0", n)
			}
			clk.add(time.Second)
			if tc.query {
				if n := rp.Sweep(t.Context()); n != 0 || rc.IsClosed() {
					t.Fatalf("redialed %d peers (relayed connection closed: %v) with a query on it, want none", n, rc.IsClosed())
				}
				if _, err := q.Write([]byte{1}); err != nil {
					t.Fatal(err)
				}
				_, _ = q.Read(make([]byte, 1))
				_ = q.Close()
				waitStreams(t, rc)
			}
			n := rp.Sweep(t.Context())
			if !tc.replaced {
				if n != 0 || rc.IsClosed() {
					t.Fatalf("redialed %d peers, relayed connection closed %v; want it left alone", n, rc.IsClosed())
				}
				return
			}
			if n != 1 || !rc.IsClosed() {
				t.Fatalf("redialed %d peers, old relayed connection closed %v; want it replaced", n, rc.IsClosed())
			}
			// Its disconnection is not its departure, for a moment.
			if !rp.Reconnecting(b.ID()) || rp.Reconnecting(r.ID()) {
				t.Fatalf("reconnecting: peer %v, relay %v; want the peer only", rp.Reconnecting(b.ID()), rp.Reconnecting(r.ID()))
			}
			conns := a.Network().ConnsToPeer(b.ID())
			if len(conns) != 1 || !relayaddr.IsRelayed(conns[0]) || conns[0] == rc {
				t.Fatalf("connections %v after the try, want one new relayed", conns)
			}
			for deadline := time.Now().Add(5 * time.Second); in.count() == 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no new circuit came in to the peer: its libp2p has nothing to punch on")
				}
			}
			// Then twice the wait, then four times (the most here).
			for i, wait := range []time.Duration{2 * firstWait, 4 * firstWait, 4 * firstWait} {
				clk.add(wait - time.Second)
				if n := rp.Sweep(t.Context()); n != 0 {
					t.Fatalf("try %d: redialed %d peers before its wait of %s", i+2, n, wait)
				}
				clk.add(time.Second)
				quiet(t, a, b)
				if n := rp.Sweep(t.Context()); n != 1 {
					t.Fatalf("try %d: redialed %d peers after its wait of %s, want 1", i+2, n, wait)
				}
			}
			rp.mu.Lock()
			got := rp.tries
			rp.mu.Unlock()
			if got != 4 {
				t.Fatalf("%d tries, want 4", got)
			}
			// A direct connection back that dies within minutes (a
			// punch whose path does not hold) leaves the waits long;
			// one that lasted starts them over.
			for _, lasted := range []bool{false, true} {
				rp.stable = time.Hour
				if lasted {
					rp.stable = 0
				}
				g.closed.Store(false)
				dc := direct(t, a, b)
				clk.add(time.Hour)
				if n := rp.Sweep(t.Context()); n != 0 {
					t.Fatalf("redialed %d peers with a direct connection, want 0", n)
				}
				g.closed.Store(true)
				_ = dc.Close()
				waitLost(t, rp, b.ID())
				clk.add(firstWait)
				quiet(t, a, b)
				n := rp.Sweep(t.Context())
				if lasted && n != 1 {
					t.Fatalf("redialed %d peers one first wait after a lasting direct connection was lost, want 1", n)
				}
				if !lasted {
					if n != 0 {
						t.Fatalf("redialed %d peers one first wait after a short-lived direct connection was lost, want 0 (the waits stay long)", n)
					}
					clk.add(3 * firstWait) // the most, 4 × the first
					if n := rp.Sweep(t.Context()); n != 1 {
						t.Fatalf("redialed %d peers after the longest wait, want 1", n)
					}
				}
			}
		})
	}
}

// quiet waits until a's connections to b carry only streams a reconnect
// may break, b's identify on them included: b opens its stream a moment
// after a new circuit comes in, and it would hold a try off.
func quiet(t *testing.T, a, b host.Host) {
	t.Helper()
	for _, c := range b.Network().ConnsToPeer(a.ID()) {
		<-b.(interface{ IDService() identify.IDService }).IDService().IdentifyWait(c)
	}
	for _, c := range a.Network().ConnsToPeer(b.ID()) {
		waitStreams(t, c)
	}
}

// waitStreams waits until c carries only streams a reconnect may break:
// identify runs on a new connection for a moment.
func waitStreams(t *testing.T, c network.Conn) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		ok := true
		for _, s := range c.GetStreams() {
			ok = ok && safe(s.Protocol())
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			var open []string
			for _, s := range c.GetStreams() {
				open = append(open, fmt.Sprintf("%s %q", s.Stat().Direction, s.Protocol()))
			}
			t.Fatalf("streams still open: %v", open)
		}
	}
}

// waitLost waits until rp has heard that the direct connection to p
// closed (libp2p tells it a moment after the close).
func waitLost(t *testing.T, rp *Repuncher, p peer.ID) {
	t.Helper()
	waitDue(t, rp, p, "the direct connection's close was not noted")
}

// waitDue waits until a try with p is due at rp, and fails with why
// after 5 s.
func waitDue(t *testing.T, rp *Repuncher, p peer.ID, why string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		rp.mu.Lock()
		s := rp.peers[p]
		due := s != nil && !s.next.IsZero()
		rp.mu.Unlock()
		if due {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(why)
		}
	}
}

// TestNeverDirectIsTriedAgain: a peer behind a NAT reached through a
// relay, whose punch failed (no direct connection ever opened). The end
// that dialed the circuit replaces it once the unpunched wait has passed
// since a sweep first saw the peer so, then after twice the wait, then
// the most; once a punch succeeds, nothing is due while it lasts and its
// losses get the waits of a pair that punches. Left alone: a circuit the
// peer dialed and a pair of which an end serves no hole punching. With
// circuits both ways the end with the lower peer ID tries; the higher
// leaves its due try to the peer for a wait, then makes it. A peer due
// with no circuit waits for one and gives libp2p's punch on it the wait
// anew.
func TestNeverDirectIsTriedAgain(t *testing.T) {
	const unpunched = 2 * time.Minute
	cases := []struct {
		name     string
		fromPeer bool // the peer dialed the circuit
		bothWays bool // and one was dialed from here too
		lower    bool // this end's peer ID is the lower (with bothWays)
		noPunch  bool // the peer serves no hole punching
		noServe  bool // this end serves none
		gone     bool // the circuit is gone when the try is due
		tried    bool
		yields   bool // the first due try is left to the peer
		peerTry  bool // which makes it, while this end waits
	}{
		{name: "a circuit dialed from here", tried: true},
		{name: "the peer dialed the circuit", fromPeer: true},
		{name: "the peer serves no hole punching", noPunch: true},
		{name: "this end serves no hole punching", noServe: true},
		{name: "circuits both ways, this end the lower", bothWays: true, lower: true, tried: true},
		{name: "circuits both ways, the peer the lower", bothWays: true, yields: true, tried: true},
		{name: "circuits both ways, the peer the lower tries", bothWays: true, yields: true, peerTry: true},
		{name: "the circuit gone when due", gone: true, tried: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := &natGater{}
			a := newHost(t, libp2p.ConnectionGater(g))
			// b is behind a NAT too: its dials of a's own addresses
			// (learnt by identify) fail.
			gb := &natGater{}
			gb.peer.Store(a.ID())
			gb.closed.Store(true)
			b := newHostOrdered(t, a.ID(), !tc.bothWays || tc.lower, libp2p.ConnectionGater(gb))
			g.peer.Store(b.ID())
			g.closed.Store(true) // a punch would fail
			if !tc.noServe {
				servePunch(a)
			}
			if !tc.noPunch {
				servePunch(b)
			}
			clk := &clock{t: time.Unix(1_800_000_000, 0)}
			rp := New(a, WithSafe(safe), WithBackoff(firstWait, 4*unpunched), WithUnpunched(unpunched))
			rp.now = clk.now
			rp.fresh = 0 // the circuits are seconds old: TestFreshCircuitIsLeftToItsPunch
			rp.Attach()
			t.Cleanup(rp.Close)
			r := relaytest.New(t)
			relaytest.Reserve(t, b, r)
			var rc network.Conn
			switch {
			case tc.bothWays:
				relaytest.Reserve(t, a, r)
				rc = dialBothWays(t, a, b, r)
			case tc.fromPeer:
				relaytest.Reserve(t, a, r)
				relaytest.Dial(t, b, a, r)
			default:
				rc = relaytest.Dial(t, a, b, r)
			}
			waitIdentified(t, a, b.ID())
			in := watchInbound(b)
			sweepAfter := func(wait time.Duration, want int, what string) {
				t.Helper()
				clk.add(wait)
				quiet(t, a, b)
				if n := rp.Sweep(t.Context()); n != want {
					t.Fatalf("%s: redialed %d peers, want %d", what, n, want)
				}
			}
			sweepAfter(0, 0, "the first sight")
			sweepAfter(unpunched-time.Second, 0, "a second before the unpunched wait")
			if !tc.tried && !tc.yields {
				sweepAfter(time.Hour, 0, "an hour on")
				if !tc.bothWays {
					rp.mu.Lock()
					defer rp.mu.Unlock()
					if rp.peers[b.ID()] != nil {
						t.Fatal("the peer is remembered, want it left alone")
					}
				}
				return
			}
			if tc.gone {
				for _, c := range a.Network().ConnsToPeer(b.ID()) {
					_ = c.Close()
				}
				sweepAfter(time.Second, 0, "due, with no circuit")
				// An hour on a query dials it again; libp2p punches on
				// the new circuit, which a try now would spoil.
				clk.add(time.Hour)
				rc = relaytest.Dial(t, a, b, r)
				waitStreams(t, rc)
				sweepAfter(0, 0, "the new circuit's first sight")
				sweepAfter(unpunched-time.Second, 0, "a second before the wait anew")
			}
			if tc.yields {
				sweepAfter(time.Second, 0, "the unpunched wait, the peer's turn")
				if rc.IsClosed() {
					t.Fatal("the relayed connection closed on the peer's turn")
				}
				if tc.peerTry {
					// b closes its connections to a and dials a new
					// circuit, on which a's libp2p punches: a is left
					// with an incoming circuit, b's to replace.
					for _, c := range b.Network().ConnsToPeer(a.ID()) {
						_ = c.Close()
					}
					for deadline := time.Now().Add(5 * time.Second); len(a.Network().ConnsToPeer(b.ID())) > 0; time.Sleep(5 * time.Millisecond) {
						if time.Now().After(deadline) {
							t.Fatal("a still connected to b after b closed their connections")
						}
					}
					relaytest.Dial(t, b, a, r)
					sweepAfter(unpunched, 0, "a wait more, the peer having tried")
					rp.mu.Lock()
					defer rp.mu.Unlock()
					if s := rp.peers[b.ID()]; s == nil || !s.next.IsZero() {
						t.Fatalf("state after the peer's try: %+v, want waiting for a circuit from here", s)
					}
					return
				}
				sweepAfter(unpunched-time.Second, 0, "a second before a wait more")
				sweepAfter(time.Second, 1, "a wait more, the peer having made no try")
			} else {
				sweepAfter(time.Second, 1, "the unpunched wait")
			}
			if !rc.IsClosed() {
				t.Fatal("the relayed connection is still open after the try, want it replaced")
			}
			for deadline := time.Now().Add(5 * time.Second); in.count() == 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no new circuit came in to the peer: its libp2p has nothing to punch on")
				}
			}
			if tc.gone {
				return
			}
			sweepAfter(2*unpunched-time.Second, 0, "a second before twice the wait")
			sweepAfter(time.Second, 1, "twice the wait")
			sweepAfter(4*unpunched-time.Second, 0, "a second before four times the wait")
			sweepAfter(time.Second, 1, "four times the wait, the most")
			sweepAfter(4*unpunched, 1, "the most again")
			// The punch succeeds: nothing is due while it lasts, and
			// its loss gets the first wait of a pair that punches.
			g.closed.Store(false)
			dc := direct(t, a, b)
			rp.mu.Lock()
			st := *rp.peers[b.ID()]
			rp.mu.Unlock()
			if !st.next.IsZero() || st.never || st.delay != firstWait {
				t.Fatalf("state with a direct connection: next %v, never %v, delay %s; want nothing due and the first wait", st.next, st.never, st.delay)
			}
			g.closed.Store(true)
			rp.young = 0 // not a death in its punch: see TestDeathInThePunchIsTriedSoon
			_ = dc.Close()
			waitLost(t, rp, b.ID())
			sweepAfter(firstWait-time.Second, 0, "a second before the first wait after the punched connection's loss")
			sweepAfter(time.Second, 1, "the first wait after the punched connection's loss")
		})
	}
}

// dialBothWays makes a circuit from a to b and one from b to a, both
// through r, as two peers dialing each other at once do (a dial of a peer
// already connected reuses its connection), and returns a's.
func dialBothWays(t *testing.T, a, b, r host.Host) network.Conn {
	t.Helper()
	for _, h := range []host.Host{a, b} {
		if err := h.Connect(t.Context(), peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	for range 50 {
		var wg sync.WaitGroup
		for _, d := range [][2]host.Host{{a, b}, {b, a}} {
			wg.Go(func() {
				_ = d[0].Connect(t.Context(), peer.AddrInfo{ID: d[1].ID(), Addrs: []ma.Multiaddr{relaytest.Circuit(r)}})
			})
		}
		wg.Wait()
		var out network.Conn
		in := false
		for _, c := range a.Network().ConnsToPeer(b.ID()) {
			if c.Stat().Direction == network.DirOutbound {
				out = c
			} else {
				in = true
			}
		}
		if out != nil && in {
			return out
		}
		for _, c := range a.Network().ConnsToPeer(b.ID()) {
			_ = c.Close()
		}
		for deadline := time.Now().Add(5 * time.Second); len(b.Network().ConnsToPeer(a.ID())) > 0; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("b still connected to a after a closed their connections")
			}
		}
	}
	t.Fatal("no circuits both ways after 50 pairs of dials at once")
	return nil
}

// newHostOrdered is a host whose peer ID is above other's, or below it.
func newHostOrdered(t *testing.T, other peer.ID, above bool, opts ...libp2p.Option) host.Host {
	t.Helper()
	for {
		h := newHost(t, opts...)
		if (h.ID() > other) == above {
			return h
		}
		h.Close()
	}
}

// servePunch makes h serve the hole-punch protocol, as libp2p's service
// does once it has found a public address (a test's hosts have none).
func servePunch(h host.Host) {
	h.SetStreamHandler(holepunch.Protocol, func(s network.Stream) { _ = s.Reset() })
}

// waitIdentified waits until h knows whether p serves hole punching:
// identify has run on the connection p dialed.
func waitIdentified(t *testing.T, h host.Host, p peer.ID) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ps, err := h.Peerstore().GetProtocols(p); err == nil && slices.Contains(ps, identify.ID) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("identify did not run")
		}
	}
}

// behindNAT is a host a, a peer b behind the NAT g stands in for, and a's
// Repuncher on a settable clock, not attached yet.
func behindNAT(t *testing.T) (*natGater, host.Host, host.Host, *clock, *Repuncher) {
	t.Helper()
	g := &natGater{}
	a, b := newHost(t, libp2p.ConnectionGater(g)), newHost(t)
	g.peer.Store(b.ID())
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	rp := New(a, WithSafe(safe), WithBackoff(firstWait, 4*firstWait))
	rp.now = clk.now
	return g, a, b, clk, rp
}

// attachedWithCircuit attaches rp (a's) and dials b from a through a new
// relay that b holds a reservation on; it returns the circuit, once
// identify is done with it.
func attachedWithCircuit(t *testing.T, rp *Repuncher, a, b host.Host) network.Conn {
	t.Helper()
	rp.Attach()
	t.Cleanup(rp.Close)
	r := relaytest.New(t)
	relaytest.Reserve(t, b, r)
	rc := relaytest.Dial(t, a, b, r)
	waitStreams(t, rc)
	return rc
}

// outboundCircuit is a's circuit to b dialed from a, or nil.
func outboundCircuit(a host.Host, b peer.ID) network.Conn {
	for _, c := range a.Network().ConnsToPeer(b) {
		if relayaddr.IsRelayed(c) && c.Stat().Direction == network.DirOutbound {
			return c
		}
	}
	return nil
}

// A direct connection that dies at once died in its punch (both ends
// kept different connections): the pair is tried again after the quick
// wait, twice, and then after the waits that run on; quick tries do not
// lengthen them.
func TestDeathInThePunchIsTriedSoon(t *testing.T) {
	g, a, b, clk, rp := behindNAT(t)
	rp.fresh = 0 // the circuits are seconds old: TestFreshCircuitIsLeftToItsPunch
	attachedWithCircuit(t, rp, a, b)
	// dies opens a direct connection and closes it at once.
	dies := func() {
		t.Helper()
		g.closed.Store(false)
		dc := direct(t, a, b)
		g.closed.Store(true)
		_ = dc.Close()
		waitLost(t, rp, b.ID())
	}
	sweepAfter := func(wait time.Duration, want int, what string) {
		t.Helper()
		clk.add(wait)
		quiet(t, a, b)
		if n := rp.Sweep(t.Context()); n != want {
			t.Fatalf("%s: redialed %d peers, want %d", what, n, want)
		}
	}
	for i := 1; i <= maxQuick; i++ {
		dies()
		sweepAfter(DefaultQuick-time.Second, 0, fmt.Sprintf("quick try %d, a second early", i))
		sweepAfter(time.Second, 1, fmt.Sprintf("quick try %d", i))
	}
	// A third death at once: the waits go on, from the first (the quick
	// tries did not double it).
	dies()
	sweepAfter(DefaultQuick, 0, "after two quick tries, the quick wait")
	sweepAfter(firstWait-DefaultQuick, 1, "the first wait")
	// A direct connection that outlived its punch ends the row: the next
	// one to die at once is tried soon again. Its own loss is the path's
	// (the waits, not a quick try).
	rp.direct(b.ID())
	rp.lost(b.ID(), DefaultYoung)
	sweepAfter(DefaultQuick, 0, "a connection that lived the young bound, the quick wait")
	dies()
	sweepAfter(DefaultQuick, 1, "a quick try after a connection that outlived its punch")
}

// TestTheLastDirectConnectionStartsTheWait: of two direct connections,
// one closes; the other outlives the first wait, so nothing is due; when
// it closes too, the first wait runs from then, not from the first loss.
func TestTheLastDirectConnectionStartsTheWait(t *testing.T) {
	g := &natGater{}
	bKey, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	a, b := newHost(t, libp2p.ConnectionGater(g)), newHost(t, libp2p.Identity(bKey))
	g.peer.Store(b.ID())
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	rp := New(a, WithSafe(safe), WithBackoff(firstWait, 4*firstWait))
	rp.now = clk.now
	rp.fresh = 0 // the circuits are seconds old: TestFreshCircuitIsLeftToItsPunch
	rp.young = 0
	attachedWithCircuit(t, rp, a, b)
	d1 := direct(t, a, b)
	// A second direct connection, from a second process with b's key
	// (libp2p would reuse the first for a dial of b's own).
	b2 := newHost(t, libp2p.Identity(bKey))
	if err := b2.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}); err != nil {
		t.Fatal(err)
	}
	var d2 network.Conn
	for _, c := range a.Network().ConnsToPeer(b.ID()) {
		if c != d1 && !relayaddr.IsRelayed(c) {
			d2 = c
		}
	}
	if d2 == nil {
		t.Fatalf("connections %v, want two direct beside the relayed", a.Network().ConnsToPeer(b.ID()))
	}
	_ = d1.Close()
	waitDirect(t, rp, b.ID(), 1)
	clk.add(firstWait)
	if n := rp.Sweep(t.Context()); n != 0 {
		t.Fatalf("redialed %d peers with a direct connection left, want 0", n)
	}
	g.closed.Store(true)
	_ = d2.Close()
	waitLost(t, rp, b.ID())
	clk.add(time.Second)
	if n := rp.Sweep(t.Context()); n != 0 {
		t.Fatalf("redialed %d peers a second after the last direct connection closed, want 0 until the first wait", n)
	}
	clk.add(firstWait)
	if n := rp.Sweep(t.Context()); n != 1 {
		t.Fatalf("redialed %d peers a first wait after the last direct connection closed, want 1", n)
	}
}

// waitDirect waits until rp counts n direct connections to p.
func waitDirect(t *testing.T, rp *Repuncher, p peer.ID, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		rp.mu.Lock()
		s := rp.peers[p]
		got := s != nil && s.direct == n
		rp.mu.Unlock()
		if got {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("direct connections to the peer not counted %d", n)
		}
	}
}

// TestForgetOneKeepsPeersConnectedDirectly: at the bound, the peer let go
// is, of those not reached directly now, the one seen longest ago; a peer
// connected directly is the one to punch again when its connection dies.
func TestForgetOneKeepsPeersConnectedDirectly(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct {
		name  string
		peers map[peer.ID]*state
		want  peer.ID // the one let go
	}{
		{"the idle one, though seen later", map[peer.ID]*state{
			"direct-old": {direct: 1, seen: base},
			"idle-new":   {seen: base.Add(time.Hour)},
		}, "idle-new"},
		{"the oldest of the idle ones", map[peer.ID]*state{
			"idle-old":   {seen: base},
			"direct-old": {direct: 2, seen: base.Add(-time.Hour)},
			"idle-new":   {seen: base.Add(time.Hour)},
		}, "idle-old"},
		{"all direct: the oldest", map[peer.ID]*state{
			"direct-old": {direct: 1, seen: base},
			"direct-new": {direct: 1, seen: base.Add(time.Hour)},
		}, "direct-old"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &Repuncher{peers: tc.peers}
			n := len(tc.peers)
			r.forgetOne()
			if _, ok := r.peers[tc.want]; ok || len(r.peers) != n-1 {
				t.Fatalf("left %v, want all but %s", r.peers, tc.want)
			}
		})
	}
}

// A peer due for a quick try with no circuit to replace waits for one,
// and the try when one comes is no longer quick: it doubles the wait as
// any try does.
func TestParkedQuickTryIsNotQuick(t *testing.T) {
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	rp := New(newHost(t), WithSafe(safe), WithBackoff(firstWait, 4*firstWait))
	rp.now = clk.now
	rp.fresh = 0 // the circuits are seconds old: TestFreshCircuitIsLeftToItsPunch
	p := peer.ID("a peer with no connection")
	rp.direct(p)
	rp.lost(p, 0) // died in its punch: a quick try is due
	clk.add(DefaultQuick)
	if n := rp.Sweep(t.Context()); n != 0 {
		t.Fatalf("redialed %d peers with no circuit, want 0", n)
	}
	rp.mu.Lock()
	s := *rp.peers[p]
	rp.mu.Unlock()
	if !s.next.IsZero() || s.quickTry {
		t.Fatalf("after a sweep with no circuit: next %v, quick try %v; want waiting for a circuit, not quick", s.next, s.quickTry)
	}
}

// TestFreshCircuitIsLeftToItsPunch: a direct connection is lost, and a
// query dials the peer through its relay a moment before the try is due.
// libp2p punches on that new circuit in its first seconds, so the try
// waits until the circuit is DefaultFresh old, then replaces it. A young
// circuit whose punch made a direct connection (which died at once) is
// done with its punch: its quick try is made.
func TestFreshCircuitIsLeftToItsPunch(t *testing.T) {
	g, a, b, clk, rp := behindNAT(t)
	rp.young = 0 // the direct connection's loss is its path's
	rp.Attach()
	t.Cleanup(rp.Close)
	r := relaytest.New(t)
	relaytest.Reserve(t, b, r)
	_ = direct(t, a, b).Close()
	g.closed.Store(true)
	waitLost(t, rp, b.ID())
	clk.add(firstWait - time.Second)
	rc := relaytest.Dial(t, a, b, r)
	quiet(t, a, b)
	clk.add(time.Second)
	if age := time.Since(rc.Stat().Opened); age >= rp.fresh {
		t.Fatalf("the circuit is %s old, want under the default %s", age, rp.fresh)
	}
	if n := rp.Sweep(t.Context()); n != 0 || rc.IsClosed() {
		t.Fatalf("due, with a circuit in its punch: redialed %d peers (circuit closed: %v), want it left alone", n, rc.IsClosed())
	}
	rp.mu.Lock()
	due := !rp.peers[b.ID()].next.IsZero()
	rp.mu.Unlock()
	if !due {
		t.Fatal("the try is no longer due after it was held off, want it kept")
	}
	rp.fresh = 0 // the circuit's age reached
	quiet(t, a, b)
	if n := rp.Sweep(t.Context()); n != 1 || !rc.IsClosed() {
		t.Fatalf("the circuit past its punch: redialed %d peers (circuit closed: %v), want it replaced", n, rc.IsClosed())
	}

	// The punch on the new circuit opens a direct connection that dies at
	// once (each end kept a different one): that circuit's punch is
	// over, and the quick try does not wait for the circuit's age.
	rp.fresh = time.Hour
	nc := outboundCircuit(a, b.ID())
	if nc == nil { // the redial's dial failed
		nc = relaytest.Dial(t, a, b, r)
	}
	g.closed.Store(false)
	dc := direct(t, a, b)
	g.closed.Store(true)
	rp.young = DefaultYoung
	_ = dc.Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		rp.mu.Lock()
		quick := rp.peers[b.ID()].quickTry
		rp.mu.Unlock()
		if quick {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the direct connection's death in its punch was not noted")
		}
	}
	clk.add(DefaultQuick)
	quiet(t, a, b)
	if n := rp.Sweep(t.Context()); n != 1 || !nc.IsClosed() {
		t.Fatalf("a quick try on a young circuit punched already: redialed %d peers (circuit closed: %v), want it replaced", n, nc.IsClosed())
	}
}

// TestNoTryWhileRoutersRememberAFailedPunch: a try that made no direct
// connection dialed a new circuit, on which libp2p punched and failed.
// The NAT routers remember that punch for 2 min after its last SYN, and
// a try meanwhile would fail by it, so the circuit is not replaced before
// it is DefaultFresh old, however far past its wait the clock is; then it
// is. (The circuit the first try replaced predates the last direct
// connection: its punch was long over.)
func TestNoTryWhileRoutersRememberAFailedPunch(t *testing.T) {
	// libp2p's punch on a circuit ends within 45 s of its opening, and
	// Linux keeps a failed SYN's entry 2 min after the last one.
	if least := 45*time.Second + 2*time.Minute; DefaultFresh < least {
		t.Fatalf("DefaultFresh %s: a try could come while the routers remember the failed punch, want %s at the least", DefaultFresh, least)
	}
	g, a, b, clk, rp := behindNAT(t)
	rp.young = 0 // the direct connection's loss is its path's
	old := attachedWithCircuit(t, rp, a, b)
	dc := direct(t, a, b)
	g.closed.Store(true) // punches fail from now on
	_ = dc.Close()
	waitLost(t, rp, b.ID())
	clk.add(firstWait)
	quiet(t, a, b)
	if n := rp.Sweep(t.Context()); n != 1 || !old.IsClosed() {
		t.Fatalf("the first wait: redialed %d peers (old circuit closed: %v), want it replaced", n, old.IsClosed())
	}
	nc := outboundCircuit(a, b.ID())
	if nc == nil {
		t.Fatal("the try dialed no new circuit")
	}
	clk.add(time.Hour) // far past every wait
	quiet(t, a, b)
	if age := time.Since(nc.Stat().Opened); age >= rp.fresh {
		t.Fatalf("the try's circuit is %s old, want under %s", age, rp.fresh)
	}
	if n := rp.Sweep(t.Context()); n != 0 || nc.IsClosed() {
		t.Fatalf("an hour on the clock, the try's circuit younger than DefaultFresh: redialed %d peers (circuit closed: %v), want it left", n, nc.IsClosed())
	}
	rp.fresh = 0 // the circuit's age reached
	quiet(t, a, b)
	if n := rp.Sweep(t.Context()); n != 1 || !nc.IsClosed() {
		t.Fatalf("the try's circuit DefaultFresh old: redialed %d peers (circuit closed: %v), want it replaced", n, nc.IsClosed())
	}
}

// The end with the higher peer ID leaves a due try to its peer for a
// wait; a quick try, for two of the peer's sweeps.
func TestYieldFor(t *testing.T) {
	rp := New(newHost(t), WithBackoff(firstWait, 4*firstWait))
	for _, tc := range []struct {
		name string
		s    state
		want time.Duration
	}{
		{"a try after a wait", state{delay: 2 * firstWait}, 2 * firstWait},
		{"a quick try", state{delay: 2 * firstWait, quickTry: true}, 2 * DefaultInterval},
	} {
		if got := rp.yieldFor(&tc.s); got != tc.want {
			t.Errorf("%s: yields %s, want %s", tc.name, got, tc.want)
		}
	}
}

// TestUnpunchedCircuitIsTriedWhenServed: libp2p's hole-punch service
// starts only once its host has found a public address, so a circuit
// that opens before, at either end (a volunteer's node restarting is
// dialed through its relays at once), is never punched. When the peer
// begins to serve the protocol (its identify push) or this host does, the
// circuits dialed from here are replaced a moment later, however young;
// a circuit the peer dialed, a peer reached directly too, and a pair of
// which this end serves no hole punching are left alone.
func TestUnpunchedCircuitIsTriedWhenServed(t *testing.T) {
	cases := []struct {
		name     string
		late     string // the end that begins to serve: "peer" or "here"
		never    bool   // the other end never serves
		fromPeer bool   // the peer dialed the circuit
		direct   bool   // a direct connection beside the circuit
		replaced bool
	}{
		{name: "the peer begins to serve", late: "peer", replaced: true},
		{name: "this host begins to serve", late: "here", replaced: true},
		{name: "the peer begins to serve, its own circuit", late: "peer", fromPeer: true},
		{name: "this host begins to serve, the peer's circuit", late: "here", fromPeer: true},
		{name: "the peer begins to serve, reached directly too", late: "peer", direct: true},
		{name: "this host begins to serve, reached directly too", late: "here", direct: true},
		{name: "the peer begins to serve, this host never", late: "peer", never: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g, a, b, _, rp := behindNAT(t)
			rp.settle = 50 * time.Millisecond
			early, late := a, b
			if tc.late == "here" {
				early, late = b, a
			}
			if !tc.never {
				servePunch(early) // before Attach: no start of its own seen
			}
			rp.Attach()
			t.Cleanup(rp.Close)
			r := relaytest.New(t)
			relaytest.Reserve(t, b, r)
			var rc network.Conn
			if tc.fromPeer {
				relaytest.Reserve(t, a, r)
				relaytest.Dial(t, b, a, r)
			} else {
				rc = relaytest.Dial(t, a, b, r)
			}
			if tc.direct {
				direct(t, a, b)
			}
			g.closed.Store(true)
			waitIdentified(t, a, b.ID())
			waitIdentified(t, b, a.ID())
			quiet(t, a, b)
			in := watchInbound(b)
			go rp.Run(t.Context())
			servePunch(late)
			if !tc.replaced {
				// The push has reached a (or a serves): Run had it a
				// moment later.
				for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
					if ok, _ := a.Peerstore().SupportsProtocols(b.ID(), holepunch.Protocol); len(ok) > 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("a did not learn that b serves hole punching")
					}
				}
				time.Sleep(10 * rp.settle)
				rp.mu.Lock()
				tries, due := rp.tries, rp.peers[b.ID()] != nil && !rp.peers[b.ID()].next.IsZero()
				rp.mu.Unlock()
				if tries != 0 || due || in.count() != 0 || rc != nil && rc.IsClosed() {
					t.Fatalf("redialed %d peers, a try due %v, %d new circuits at the peer; want it left alone", tries, due, in.count())
				}
				return
			}
			for deadline := time.Now().Add(5 * time.Second); !rc.IsClosed() || in.count() == 0; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the circuit opened before %s served hole punching: closed %v, %d new circuits at the peer; want it replaced", tc.late, rc.IsClosed(), in.count())
				}
			}
			if age := time.Since(rc.Stat().Opened); age >= rp.fresh {
				t.Fatalf("the circuit was %s old, want under %s (a fresh circuit replaced for being unpunched)", age, rp.fresh)
			}
			// The new circuit is punched (both ends serve): it is left
			// to its punch, and the waits are as they were. Only the
			// end that began has a start of its own.
			rp.mu.Lock()
			s, here := *rp.peers[b.ID()], rp.ready
			rp.mu.Unlock()
			if s.quickTry || s.delay != rp.unpunched {
				t.Fatalf("after the try: quick %v, wait %s; want a wait of %s, not lengthened", s.quickTry, s.delay, rp.unpunched)
			}
			if (tc.late == "here") == here.IsZero() || (tc.late == "peer") == s.ready.IsZero() {
				t.Fatalf("this host's start %v, the peer's %v; want only the %s's", here, s.ready, tc.late)
			}
		})
	}
}

// A punch with the peer that failed lately, on a circuit gone since (the
// peer restarted), is remembered by the NAT routers for 2 min after its
// last SYN and would spoil a new one: the try at once for a circuit
// opened before the peer served hole punching waits until
// DefaultRemembered has passed since the failure. A failure long past, or
// one a successful punch followed, holds nothing off.
func TestNoTryWhileAFailedPunchIsRemembered(t *testing.T) {
	if least := 2 * time.Minute; DefaultRemembered <= least {
		t.Fatalf("DefaultRemembered %s: a try could come while the routers remember the failed punch, want over %s", DefaultRemembered, least)
	}
	failed := &holepunch.Event{Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Error: "all retries failed"}}
	succeeded := &holepunch.Event{Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Success: true}}
	cases := []struct {
		name   string
		events []*holepunch.Event
		since  time.Duration // from the last event to the peer's start
		held   bool
	}{
		{name: "a punch failed just before", events: []*holepunch.Event{failed}, held: true},
		{name: "a punch failed a while before", events: []*holepunch.Event{failed}, since: DefaultRemembered - time.Second, held: true},
		{name: "a punch failed long before", events: []*holepunch.Event{failed}, since: DefaultRemembered},
		{name: "a punch failed, then one succeeded", events: []*holepunch.Event{failed, succeeded}},
		{name: "no punch", events: nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g, a, b, clk, rp := behindNAT(t)
			servePunch(a)
			rp.Attach()
			t.Cleanup(rp.Close)
			r := relaytest.New(t)
			relaytest.Reserve(t, b, r)
			rc := relaytest.Dial(t, a, b, r)
			g.closed.Store(true)
			waitIdentified(t, a, b.ID())
			waitIdentified(t, b, a.ID())
			for _, e := range tc.events {
				e.Remote = b.ID()
				rp.Trace(e)
			}
			clk.add(tc.since)
			servePunch(b) // the restarted peer begins to serve: a try at once
			waitDue(t, rp, b.ID(), "no try due after the peer began to serve hole punching")
			quiet(t, a, b)
			n := rp.Sweep(t.Context())
			if !tc.held {
				if n != 1 || !rc.IsClosed() {
					t.Fatalf("redialed %d peers (circuit closed: %v), want the circuit replaced at once", n, rc.IsClosed())
				}
				return
			}
			if n != 0 || rc.IsClosed() {
				t.Fatalf("redialed %d peers (circuit closed: %v), want the try held off while the routers remember the failed punch", n, rc.IsClosed())
			}
			clk.add(DefaultRemembered - tc.since) // the failure's end, DefaultRemembered ago
			quiet(t, a, b)
			if n := rp.Sweep(t.Context()); n != 1 || !rc.IsClosed() {
				t.Fatalf("DefaultRemembered after the failed punch: redialed %d peers (circuit closed: %v), want it replaced", n, rc.IsClosed())
			}
		})
	}
}

// What counts as a failed punch: a punch that dialed TCP (or whose start
// went unseen), or the direct dial before it, that failed, unless a
// direct connection opened since it began (the other end's dial made
// it), open still or not; a QUIC punch that failed spoils none after it; a direct connection
// older than the punch says nothing of it. A direct connection opening
// later ends what a failure held off. The failures remembered are
// bounded.
func TestFailedPunchesForgotten(t *testing.T) {
	failed := func(took time.Duration) *holepunch.Event {
		return &holepunch.Event{Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Error: "all dials failed", EllapsedTime: took}}
	}
	dialFailed := &holepunch.Event{Type: holepunch.DirectDialEvtT, Evt: &holepunch.DirectDialEvt{Error: "dial timeout", EllapsedTime: 5 * time.Second}}
	// started is the start of a punch in which this end dials addrs.
	started := func(addrs ...string) func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
		return func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
			rp.Trace(&holepunch.Event{Remote: b.ID(), Type: holepunch.StartHolePunchEvtT, Evt: &holepunch.StartHolePunchEvt{RemoteAddrs: addrs}})
		}
	}
	cases := []struct {
		name string
		// before runs with the hosts connected through a circuit alone,
		// before the event.
		before func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher)
		evt    *holepunch.Event
		after  func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher)
		held   bool
	}{
		{name: "a failed punch, its start unseen", evt: failed(5 * time.Second), held: true},
		{name: "a failed punch that dialed TCP", evt: failed(5 * time.Second), held: true,
			before: started("/ip4/11.4.0.1/tcp/4001")},
		{name: "a failed punch that dialed QUIC and TCP", evt: failed(5 * time.Second), held: true,
			before: started("/ip4/11.4.0.1/udp/4001/quic-v1", "/ip4/11.4.0.1/tcp/4001")},
		{name: "a failed punch that dialed QUIC alone", evt: failed(5 * time.Second),
			before: started("/ip4/11.4.0.1/udp/4001/quic-v1", "/ip6/2001:db8::1/udp/4001/quic-v1")},
		// libp2p's Connect dials every address it holds, the punch's
		// and the rest.
		{name: "a failed QUIC punch to a peer whose public TCP address this end holds", evt: failed(5 * time.Second), held: true,
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				a.Peerstore().AddAddr(b.ID(), ma.StringCast("/ip4/11.4.0.1/tcp/4001"), time.Hour)
				started("/ip4/11.4.0.1/udp/4001/quic-v1")(t, g, a, b, rp)
			}},
		{name: "two QUIC attempts at once, both failed", evt: failed(5 * time.Second),
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				started("/ip4/11.4.0.1/udp/4001/quic-v1")(t, g, a, b, rp)
				started("/ip4/11.4.0.1/udp/4001/quic-v1")(t, g, a, b, rp)
				rp.Trace(&holepunch.Event{Remote: b.ID(), Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Error: "timeout"}})
			}},
		{name: "a TCP attempt and a QUIC one at once, the QUIC one failed last", evt: failed(5 * time.Second), held: true,
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				started("/ip4/11.4.0.1/tcp/4001")(t, g, a, b, rp)
				started("/ip4/11.4.0.1/udp/4001/quic-v1")(t, g, a, b, rp)
				rp.Trace(&holepunch.Event{Remote: b.ID(), Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Error: "timeout"}})
			}},
		{name: "a failed direct dial", evt: dialFailed, held: true},
		{name: "a failed punch, a direct connection since it began", evt: failed(5 * time.Second),
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				g.closed.Store(false)
				direct(t, a, b)
				waitDirect(t, rp, b.ID(), 1)
			}},
		{name: "a failed punch, a direct connection since it began, seconds before it ended", evt: failed(5 * time.Second),
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				g.closed.Store(false)
				direct(t, a, b)
				waitDirect(t, rp, b.ID(), 1)
				time.Sleep(1500 * time.Millisecond) // past the start's margin, within the punch
			}},
		{name: "a failed punch, a direct connection since it began that died", evt: failed(5 * time.Second),
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				g.closed.Store(false)
				dc := direct(t, a, b)
				waitDirect(t, rp, b.ID(), 1)
				_ = dc.Close()
				waitLost(t, rp, b.ID())
			}},
		{name: "a failed punch beside an older direct connection", evt: failed(0), held: true,
			before: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				g.closed.Store(false)
				direct(t, a, b)
				waitDirect(t, rp, b.ID(), 1)
				time.Sleep(1100 * time.Millisecond) // older than the punch's start and its margin
			}},
		{name: "a failed punch, then a direct connection", evt: failed(5 * time.Second),
			after: func(t *testing.T, g *natGater, a, b host.Host, rp *Repuncher) {
				g.closed.Store(false)
				direct(t, a, b)
				waitDirect(t, rp, b.ID(), 1)
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g, a, b, _, rp := behindNAT(t)
			attachedWithCircuit(t, rp, a, b)
			g.closed.Store(true)
			if tc.before != nil {
				tc.before(t, g, a, b, rp)
			}
			evt := *tc.evt
			evt.Remote = b.ID()
			rp.Trace(&evt)
			if tc.after != nil {
				tc.after(t, g, a, b, rp)
			}
			rp.mu.Lock()
			_, held := rp.failed[b.ID()]
			rp.mu.Unlock()
			if held != tc.held {
				t.Fatalf("tries held off: %v, want %v", held, tc.held)
			}
		})
	}
	t.Run("bounded", func(t *testing.T) {
		rp := New(newHost(t))
		for i := range maxPeers + 10 {
			rp.Trace(&holepunch.Event{Remote: peer.ID(fmt.Sprint(i)), Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{}})
		}
		rp.mu.Lock()
		n := len(rp.failed)
		rp.mu.Unlock()
		if n != maxPeers {
			t.Fatalf("%d failed punches remembered, want at most %d", n, maxPeers)
		}
	})
}
