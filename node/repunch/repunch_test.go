package repunch

import (
	"context"
	"fmt"
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
			rp.young = 0 // a test's direct connections close at once: see TestDeathInThePunchIsTriedSoon
			rp.Attach()
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
				waitStreams(t, a.Network().ConnsToPeer(b.ID())[0])
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
				waitStreams(t, a.Network().ConnsToPeer(b.ID())[0])
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
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		rp.mu.Lock()
		s := rp.peers[p]
		due := s != nil && !s.next.IsZero()
		rp.mu.Unlock()
		if due {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the direct connection's close was not noted")
		}
	}
}

// TestNeverDirectIsTriedAgain: a peer behind a NAT reached through a
// relay, whose punch failed (no direct connection ever opened). The end
// that dialed the circuit replaces it once the unpunched wait has passed
// since a sweep first saw the peer so, then after twice the wait, then
// the most; once a punch succeeds, nothing is due while it lasts. A
// circuit the peer dialed is the peer's to replace.
func TestNeverDirectIsTriedAgain(t *testing.T) {
	const unpunched = 2 * time.Minute
	for _, fromPeer := range []bool{false, true} {
		t.Run(fmt.Sprintf("the peer dialed the circuit %v", fromPeer), func(t *testing.T) {
			g := &natGater{}
			a, b := newHost(t, libp2p.ConnectionGater(g)), newHost(t)
			g.peer.Store(b.ID())
			g.closed.Store(true) // a punch would fail
			clk := &clock{t: time.Unix(1_800_000_000, 0)}
			rp := New(a, WithSafe(safe), WithBackoff(firstWait, 2*unpunched), WithUnpunched(unpunched))
			rp.now = clk.now
			rp.Attach()
			r := relaytest.New(t)
			var rc network.Conn
			if fromPeer {
				relaytest.Reserve(t, a, r)
				relaytest.Dial(t, b, a, r)
				rc = a.Network().ConnsToPeer(b.ID())[0]
			} else {
				relaytest.Reserve(t, b, r)
				rc = relaytest.Dial(t, a, b, r)
			}
			waitStreams(t, rc)
			in := watchInbound(b)
			sweepAfter := func(wait time.Duration, want int, what string) {
				t.Helper()
				clk.add(wait)
				waitStreams(t, a.Network().ConnsToPeer(b.ID())[0])
				if n := rp.Sweep(t.Context()); n != want {
					t.Fatalf("%s: redialed %d peers, want %d", what, n, want)
				}
			}
			sweepAfter(0, 0, "the first sight")
			sweepAfter(unpunched-time.Second, 0, "a second before the unpunched wait")
			if fromPeer {
				sweepAfter(time.Hour, 0, "an hour on, a circuit the peer dialed")
				rp.mu.Lock()
				defer rp.mu.Unlock()
				if rp.peers[b.ID()] != nil {
					t.Fatal("a peer reached only through a circuit it dialed is remembered, want it left to the peer")
				}
				return
			}
			sweepAfter(time.Second, 1, "the unpunched wait")
			if !rc.IsClosed() {
				t.Fatal("the relayed connection is still open after the try, want it replaced")
			}
			for deadline := time.Now().Add(5 * time.Second); in.count() == 0; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("no new circuit came in to the peer: its libp2p has nothing to punch on")
				}
			}
			sweepAfter(2*unpunched-time.Second, 0, "a second before twice the wait")
			sweepAfter(time.Second, 1, "twice the wait")
			sweepAfter(2*unpunched, 1, "the most")
			// The punch succeeds: nothing is due while it lasts.
			g.closed.Store(false)
			direct(t, a, b)
			clk.add(time.Hour)
			if n := rp.Sweep(t.Context()); n != 0 {
				t.Fatalf("redialed %d peers with a direct connection, want 0", n)
			}
		})
	}
}

// A direct connection that dies at once died in its punch (both ends
// kept different connections): the pair is tried again after the quick
// wait, twice, and then after the waits that run on; quick tries do not
// lengthen them.
func TestDeathInThePunchIsTriedSoon(t *testing.T) {
	g := &natGater{}
	a, b := newHost(t, libp2p.ConnectionGater(g)), newHost(t)
	g.peer.Store(b.ID())
	clk := &clock{t: time.Unix(1_800_000_000, 0)}
	rp := New(a, WithSafe(safe), WithBackoff(firstWait, 4*firstWait))
	rp.now = clk.now
	rp.Attach()
	r := relaytest.New(t)
	relaytest.Reserve(t, b, r)
	waitStreams(t, relaytest.Dial(t, a, b, r))
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
		waitStreams(t, a.Network().ConnsToPeer(b.ID())[0])
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
	rp.young = 0
	rp.Attach()
	r := relaytest.New(t)
	relaytest.Reserve(t, b, r)
	rc := relaytest.Dial(t, a, b, r)
	waitStreams(t, rc)
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
