package node

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
)

func loopbackHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// The punch log marks the direct connections that stand after a
// successful hole punch, ignores failed punches, and forgets a connection
// when it closes. The punch itself is libp2p's (the NAT suite makes real
// ones); here its tracer events are given on real loopback connections.
func TestPunchLogFollowsConnections(t *testing.T) {
	a, b, c := loopbackHost(t), loopbackHost(t), loopbackHost(t)
	l := newPunchLog()
	also := &tracerLog{}
	l.attach(a, also)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, h := range []host.Host{b, c} {
		if err := a.Connect(ctx, peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	conn := func(p peer.ID) network.Conn {
		cs := a.Network().ConnsToPeer(p)
		if len(cs) == 0 {
			t.Fatalf("no connection to %s", p)
		}
		return cs[0]
	}
	for _, tc := range []struct {
		name    string
		evt     *holepunch.Event
		peer    peer.ID
		punched bool
	}{
		{"a direct dial is no punch", &holepunch.Event{Remote: b.ID(), Type: holepunch.DirectDialEvtT, Evt: &holepunch.DirectDialEvt{Success: true}}, b.ID(), false},
		{"a failed punch marks nothing", &holepunch.Event{Remote: b.ID(), Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Success: false, Error: "timeout"}}, b.ID(), false},
		{"a successful punch marks the direct connection", &holepunch.Event{Remote: b.ID(), Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Success: true}}, b.ID(), true},
		{"and only that peer's", nil, c.ID(), false},
	} {
		if tc.evt != nil {
			l.Trace(tc.evt)
			// node/repunch is told every event too.
			if got := also.last(); got != tc.evt {
				t.Errorf("%s: the tracer attached beside was told %v, want the event", tc.name, got)
			}
		}
		if got := l.HolePunched(conn(tc.peer)); got != tc.punched {
			t.Errorf("%s: HolePunched = %v, want %v", tc.name, got, tc.punched)
		}
	}
	// Closed, it is forgotten (the notifiee runs asynchronously).
	_ = conn(b.ID()).Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		l.mu.Lock()
		left := len(l.conns)
		l.mu.Unlock()
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still remembered after the punched one closed", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tracerLog is a holepunch.EventTracer that keeps the last event.
type tracerLog struct {
	mu  sync.Mutex
	evt *holepunch.Event
}

func (l *tracerLog) Trace(evt *holepunch.Event) {
	l.mu.Lock()
	l.evt = evt
	l.mu.Unlock()
}

func (l *tracerLog) last() *holepunch.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.evt
}

// Either side's dial of a punch may make the connection: one that opens
// while a punch with the peer is under way, or within punchGrace after
// it ended, is the punch's even when our own attempt failed (the NAT
// suite once saw the client's view say hole-punched while the worker's
// own counted the same connection as plain direct). One that opened
// before the punch, or after the grace, is not.
func TestPunchLogCountsEitherSidesDial(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := func(p peer.ID) *holepunch.Event {
		return &holepunch.Event{Remote: p, Type: holepunch.StartHolePunchEvtT, Evt: &holepunch.StartHolePunchEvt{}}
	}
	failed := func(p peer.ID) *holepunch.Event {
		return &holepunch.Event{Remote: p, Type: holepunch.EndHolePunchEvtT, Evt: &holepunch.EndHolePunchEvt{Error: "dial failed"}}
	}
	refused := func(p peer.ID) *holepunch.Event {
		return &holepunch.Event{Remote: p, Type: holepunch.ProtocolErrorEvtT, Evt: &holepunch.ProtocolErrorEvt{Error: "stream reset"}}
	}
	const (
		connect = iota // dial the peer directly
		trace          // the step's events
		later          // the log's clock moves on by the step's shift
	)
	type step struct {
		do     int
		events func(peer.ID) []*holepunch.Event
		shift  time.Duration
	}
	events := func(fs ...func(peer.ID) *holepunch.Event) step {
		return step{do: trace, events: func(p peer.ID) []*holepunch.Event {
			var out []*holepunch.Event
			for _, f := range fs {
				out = append(out, f(p))
			}
			return out
		}}
	}
	for _, tc := range []struct {
		name    string
		steps   []step
		punched bool
	}{
		{"opened during the punch, our attempt failed", []step{events(start), {do: connect}, events(failed)}, true},
		{"opened during the punch, our retry refused", []step{events(start), {do: connect}, events(failed, refused)}, true},
		{"opened within the grace after a failed punch", []step{events(start, failed), {do: connect}}, true},
		{"opened after the grace", []step{events(start, failed), {do: later, shift: punchGrace + time.Second}, {do: connect}}, false},
		{"opened well before the punch", []step{{do: connect}, {do: later, shift: 2 * punchLead}, events(start, failed)}, false},
		{"a protocol error without a punch", []step{{do: connect}, events(refused)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := loopbackHost(t), loopbackHost(t)
			l := newPunchLog()
			var shift time.Duration
			l.now = func() time.Time { return time.Now().Add(shift) }
			l.attach(a, nil)
			for _, s := range tc.steps {
				switch s.do {
				case connect:
					if err := a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
						t.Fatal(err)
					}
				case trace:
					for _, e := range s.events(b.ID()) {
						l.Trace(e)
					}
				case later:
					shift += s.shift
				}
			}
			cs := a.Network().ConnsToPeer(b.ID())
			if len(cs) != 1 {
				t.Fatalf("%d connections to the peer, want 1", len(cs))
			}
			// The swarm tells its notifiees of a connection before the
			// dial returns, so the answer is final here.
			if got := l.HolePunched(cs[0]); got != tc.punched {
				t.Errorf("HolePunched = %v, want %v", got, tc.punched)
			}
		})
	}
}

// The log is bounded: past maxPunched the oldest entries go.
func TestPunchLogBounded(t *testing.T) {
	l := newPunchLog()
	p := peer.ID("x")
	for i := range maxPunched + 100 {
		l.add(string(rune('a'+i%26))+time.Duration(i).String(), p)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) != maxPunched || len(l.order) > 2*maxPunched {
		t.Fatalf("%d entries, order %d; want %d, at most %d", len(l.conns), len(l.order), maxPunched, 2*maxPunched)
	}
	if _, ok := l.conns["a"+time.Duration(0).String()]; ok {
		t.Error("the oldest entry is still there")
	}
}

// A node hands libp2p's hole-punch events (its punch log is the tracer
// its host was built with) on to its repuncher, which holds its tries off
// after a failed punch.
func TestNodeTellsRepuncherOfPunches(t *testing.T) {
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), WithIdentity(key), WithMDNS(false), WithListenAddrs("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	also := n.punch.also.Load()
	if also == nil || *also != holepunch.EventTracer(n.repunch) {
		t.Fatalf("the punch log hands its events to %v, want the node's repuncher", also)
	}
}
