package discovery

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// manualClock is a settable clock for table tests that exercise expiry
// without waiting.
type manualClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *manualClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *manualClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func ann(seq uint64, ttl time.Duration) *pb.Announce {
	return &pb.Announce{Seq: seq, TtlMs: uint32(ttl / time.Millisecond)}
}

func recv(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatal("event channel closed")
		}
		return ev
	default:
		t.Fatal("no event pending")
	}
	return Event{}
}

func noEvent(t *testing.T, ch <-chan Event) {
	t.Helper()
	select {
	case ev := <-ch:
		t.Fatalf("unexpected event %+v", ev)
	default:
	}
}

func TestTableLifecycle(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	self, a, b := testPeerID(t), testPeerID(t), testPeerID(t)
	tab := newPeerTable(self, 10, clk.now)
	ch, cancel := tab.Subscribe(16)
	defer cancel()

	if !tab.upsert(a, ann(5, 10*time.Second), clk.now()) {
		t.Fatal("first announce not recorded")
	}
	if ev := recv(t, ch); ev.Kind != Join || ev.Peer != a {
		t.Fatalf("event %+v, want join of a", ev)
	}
	// Same and older seq change nothing: reordering cannot roll back.
	if tab.upsert(a, ann(5, time.Minute), clk.now()) || tab.upsert(a, ann(4, time.Minute), clk.now()) {
		t.Fatal("stale announce applied")
	}
	noEvent(t, ch)
	clk.add(time.Second)
	if !tab.upsert(a, ann(6, 10*time.Second), clk.now()) {
		t.Fatal("newer announce not applied")
	}
	if ev := recv(t, ch); ev.Kind != Update || ev.Peer != a {
		t.Fatalf("event %+v, want update of a", ev)
	}
	e, ok := tab.Get(a)
	if !ok || e.Announce.GetSeq() != 6 || !e.Expires.Equal(clk.now().Add(10*time.Second)) || e.Self {
		t.Fatalf("entry %+v", e)
	}

	tab.upsert(self, ann(1, 3*time.Second), clk.now())
	tab.upsert(b, ann(1, 20*time.Second), clk.now())
	recv(t, ch)
	recv(t, ch)
	snap := tab.Snapshot()
	if len(snap) != 3 {
		t.Fatalf("snapshot has %d entries, want 3", len(snap))
	}
	for i := 1; i < len(snap); i++ {
		if snap[i-1].Peer >= snap[i].Peer {
			t.Fatalf("snapshot not sorted by peer: %s then %s", snap[i-1].Peer, snap[i].Peer)
		}
	}
	if e, _ := tab.Get(self); !e.Self {
		t.Fatal("own entry not marked Self")
	}

	// After 5 s: self (3 s ttl) has expired; Snapshot and Get hide it at
	// once, the sweep removes it with a Leave.
	clk.add(5 * time.Second)
	if _, ok := tab.Get(self); ok {
		t.Fatal("Get returned an expired entry")
	}
	if len(tab.Snapshot()) != 2 {
		t.Fatalf("snapshot shows expired entries: %v", tab.Snapshot())
	}
	if n := tab.sweep(clk.now()); n != 1 {
		t.Fatalf("sweep removed %d, want 1", n)
	}
	if ev := recv(t, ch); ev.Kind != Leave || ev.Peer != self || ev.Reason != ReasonExpired {
		t.Fatalf("event %+v, want leave of self, expired", ev)
	}

	if !tab.remove(b, ReasonDisconnected) || tab.remove(b, ReasonDisconnected) {
		t.Fatal("remove should succeed once")
	}
	if ev := recv(t, ch); ev.Kind != Leave || ev.Peer != b || ev.Reason != ReasonDisconnected {
		t.Fatalf("event %+v, want leave of b, disconnected", ev)
	}

	tab.setRTT(a, 3*time.Millisecond, false)
	if e, _ := tab.Get(a); e.RTT != 3*time.Millisecond {
		t.Fatalf("rtt = %s", e.RTT)
	}
	noEvent(t, ch)
}

// The RTT is smoothed per path: a sample on another path (direct after a
// hole punch, relayed after the direct connection died) starts over.
func TestTableRTTPerPath(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	tab := newPeerTable(testPeerID(t), 8, clk.now)
	p := testPeerID(t)
	tab.upsert(p, ann(1, time.Minute), clk.now())
	ms := time.Millisecond
	for _, tc := range []struct {
		name        string
		sample      time.Duration
		relayed     bool
		want        time.Duration
		wantRelayed bool
	}{
		{"first sample, relayed", 80 * ms, true, 80 * ms, true},
		{"relayed again: smoothed", 40 * ms, true, 70 * ms, true},
		{"direct after a hole punch: starts over", 4 * ms, false, 4 * ms, false},
		{"direct again: smoothed", 8 * ms, false, 5 * ms, false},
		{"relayed again: starts over", 60 * ms, true, 60 * ms, true},
	} {
		tab.setRTT(p, tc.sample, tc.relayed)
		e, _ := tab.Get(p)
		if e.RTT != tc.want || e.RTTRelayed != tc.wantRelayed {
			t.Errorf("%s: rtt %s relayed %v, want %s %v", tc.name, e.RTT, e.RTTRelayed, tc.want, tc.wantRelayed)
		}
	}
	tab.setRTT(testPeerID(t), ms, false) // not in the table: ignored
}

func TestTableFull(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	self := testPeerID(t)
	tab := newPeerTable(self, 2, clk.now)
	p1, p2, p3 := testPeerID(t), testPeerID(t), testPeerID(t)
	tab.upsert(p1, ann(1, time.Minute), clk.now())
	tab.upsert(p2, ann(1, time.Minute), clk.now())
	if tab.upsert(p3, ann(1, time.Minute), clk.now()) {
		t.Fatal("a new peer was added to a full table")
	}
	if !tab.upsert(p1, ann(2, time.Minute), clk.now()) {
		t.Fatal("a known peer could not update in a full table")
	}
	// Our own entry always fits: the router must be able to use itself.
	if !tab.upsert(self, ann(1, time.Minute), clk.now()) {
		t.Fatal("self not added to a full table")
	}
	tab.remove(p2, ReasonDisconnected)
	tab.remove(self, ReasonDisconnected)
	if !tab.upsert(p3, ann(1, time.Minute), clk.now()) {
		t.Fatal("no room after removals")
	}
	if tab.Len() != 2 {
		t.Fatalf("len = %d, want 2", tab.Len())
	}
}

func TestTableSlowSubscriberNeverBlocks(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	tab := newPeerTable(testPeerID(t), 100, clk.now)
	slow, cancelSlow := tab.Subscribe(2)
	defer cancelSlow()
	fast, cancelFast := tab.Subscribe(100)
	defer cancelFast()
	p := testPeerID(t)
	// 50 changes; nobody reads the slow channel. This returning at all
	// is the point: a blocked send would hang here.
	for i := uint64(1); i <= 50; i++ {
		tab.upsert(p, ann(i, time.Minute), clk.now())
	}
	if len(slow) != 2 {
		t.Fatalf("slow subscriber holds %d events, want its buffer of 2", len(slow))
	}
	if len(fast) != 50 {
		t.Fatalf("fast subscriber holds %d events, want 50", len(fast))
	}
	if ev := <-slow; ev.Kind != Join {
		t.Fatalf("slow subscriber's first event %+v, want the join", ev)
	}

	cancelSlow()
	cancelSlow() // idempotent
	tab.close()
	for range fast {
	}
	// Subscribing to a closed table yields a closed channel.
	ch, cancel := tab.Subscribe(1)
	defer cancel()
	if _, ok := <-ch; ok {
		t.Fatal("subscription to a closed table delivered an event")
	}
	if tab.upsert(testPeerID(t), ann(1, time.Minute), clk.now()) {
		t.Fatal("closed table accepted an entry")
	}
}

func TestEventKindString(t *testing.T) {
	for k, want := range map[EventKind]string{Join: "join", Update: "update", Leave: "leave", 0: "unknown"} {
		if k.String() != want {
			t.Errorf("%d.String() = %q, want %q", k, k.String(), want)
		}
	}
}

// Gossip-learnt peers wait in quarantine within their forwarder's share;
// a connection (prove) admits them, subject to the per-IP bound.
func TestTableQuarantine(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	self, fwd, other := testPeerID(t), testPeerID(t), testPeerID(t)
	tab := newPeerTable(self, 100, clk.now)
	tab.lim = tableLimits{pending: 5, perForwarder: 3, perIP: 2}
	ch, stop := tab.Subscribe(64)
	defer stop()
	gossip := func(via peer.ID, viaIP string) origin { return origin{via: via, viaIP: viaIP} }

	var fakes []peer.ID
	for range 10 {
		p := testPeerID(t)
		fakes = append(fakes, p)
		if tab.offer(p, ann(1, time.Minute), clk.now(), gossip(fwd, "10.0.0.1")) {
			t.Fatal("a gossip-learnt peer became visible")
		}
	}
	noEvent(t, ch)
	if q := tab.Quarantined(); q != 3 {
		t.Fatalf("quarantined %d, want the forwarder's share 3", q)
	}
	// Another forwarder at the same IP shares the IP's share.
	if tab.wouldTake(testPeerID(t), gossip(other, "10.0.0.1"), nil) {
		t.Fatal("a second forwarder at the same IP got more room")
	}
	if !tab.wouldTake(testPeerID(t), gossip(other, "10.0.0.2"), nil) {
		t.Fatal("a forwarder at another IP got no room")
	}
	if !tab.wouldTake(fakes[0], gossip(fwd, "10.0.0.1"), nil) {
		t.Fatal("an update of a quarantined peer was refused")
	}
	// Proving admits; at most 2 per IP.
	for i, p := range fakes[:3] {
		admitted := tab.prove(p, "10.9.9.9")
		if want := i < 2; admitted != want {
			t.Fatalf("prove #%d admitted %v, want %v", i, admitted, want)
		}
	}
	if ev := recv(t, ch); ev.Kind != Join || ev.Peer != fakes[0] {
		t.Fatalf("event %+v, want join of the first proven peer", ev)
	}
	if tab.Len() != 2 {
		t.Fatalf("%d visible, want 2", tab.Len())
	}
	// A proven peer that left comes back through gossip without a probe.
	tab.remove(fakes[0], ReasonDisconnected)
	if !tab.offer(fakes[0], ann(2, time.Minute), clk.now(), gossip(fwd, "10.0.0.1")) {
		t.Fatal("a lately proven peer was quarantined again")
	}
	// Quarantine expires like the table.
	clk.add(2 * time.Minute)
	tab.sweep(clk.now())
	if q := tab.Quarantined(); q != 0 {
		t.Fatalf("%d still quarantined after expiry", q)
	}
}

// The model index answers SnapshotModel as a scan of the whole table
// would, through updates that change an entry's models, quarantine and
// its proof, removal, expiry and sweeps, our own entry, and a model
// listed twice (once per type).
func TestTableModelIndex(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	self, a, b, c := testPeerID(t), testPeerID(t), testPeerID(t), testPeerID(t)
	tab := newPeerTable(self, 10, clk.now)
	models := func(seq uint64, ttl time.Duration, names ...string) *pb.Announce {
		an := ann(seq, ttl)
		for _, n := range names {
			an.Models = append(an.Models, &pb.ModelInfo{Name: n})
		}
		return an
	}
	all := []string{"m0", "m1", "m2"}
	for _, step := range []struct {
		name string
		do   func()
		want map[string][]peer.ID
	}{
		{"a worker", func() { tab.upsert(a, models(1, time.Minute, "m0"), clk.now()) },
			map[string][]peer.ID{"m0": {a}}},
		{"a second, two models", func() { tab.upsert(b, models(1, time.Minute, "m0", "m1"), clk.now()) },
			map[string][]peer.ID{"m0": {a, b}, "m1": {b}}},
		{"our own entry", func() { tab.upsert(self, models(1, time.Minute, "m1"), clk.now()) },
			map[string][]peer.ID{"m0": {a, b}, "m1": {b, self}}},
		{"an update changes a's models", func() { tab.upsert(a, models(2, 10*time.Second, "m1", "m2"), clk.now()) },
			map[string][]peer.ID{"m0": {b}, "m1": {a, b, self}, "m2": {a}}},
		{"a stale one does not", func() { tab.upsert(a, models(1, time.Minute, "m0"), clk.now()) },
			map[string][]peer.ID{"m0": {b}, "m1": {a, b, self}, "m2": {a}}},
		{"quarantined: not routable", func() { tab.offer(c, models(1, time.Minute, "m2", "m2"), clk.now(), origin{via: b}) },
			map[string][]peer.ID{"m0": {b}, "m1": {a, b, self}, "m2": {a}}},
		{"proven: in", func() { tab.prove(c, "10.0.0.3") },
			map[string][]peer.ID{"m0": {b}, "m1": {a, b, self}, "m2": {a, c}}},
		{"removed", func() { tab.remove(b, ReasonDisconnected) },
			map[string][]peer.ID{"m1": {a, self}, "m2": {a, c}}},
		{"expired, before the sweep", func() { clk.add(11 * time.Second) },
			map[string][]peer.ID{"m1": {self}, "m2": {c}}},
		{"swept", func() { tab.sweep(clk.now()) },
			map[string][]peer.ID{"m1": {self}, "m2": {c}}},
		{"a model listed twice, removed once", func() { tab.remove(c, ReasonDisconnected) },
			map[string][]peer.ID{"m1": {self}}},
	} {
		step.do()
		for _, m := range all {
			var scan []peer.ID
			for _, e := range tab.Snapshot() {
				if modelEntry(e.Announce, m) != nil {
					scan = append(scan, e.Peer)
				}
			}
			var got []peer.ID
			for _, e := range tab.SnapshotModel(m) {
				got = append(got, e.Peer)
			}
			want := append([]peer.ID(nil), step.want[m]...)
			slices.Sort(want)
			if !slices.Equal(got, scan) || !slices.Equal(got, want) {
				t.Fatalf("%s: SnapshotModel(%s) = %v, whole-table scan %v, want %v", step.name, m, got, scan, want)
			}
		}
	}
	tab.mu.Lock()
	defer tab.mu.Unlock()
	if len(tab.byModel) != 1 {
		t.Errorf("index holds %d models, want 1 (m1): emptied models must go", len(tab.byModel))
	}
}

// BenchmarkTableRead: what a routing decision reads from a swarm view's
// table, by size (workers spread over 50 models): the whole table (the
// baseline) or the query's model's entries.
//
//	go test ./discovery -run '^$' -bench TableRead -benchmem
func BenchmarkTableRead(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		tab := newPeerTable(testPeerID(b), n+1, nil)
		for i := range n {
			a := ann(1, time.Hour)
			a.Models = []*pb.ModelInfo{{Name: fmt.Sprintf("model-%d", i%50)}}
			tab.upsert(testPeerID(b), a, time.Now())
		}
		b.Run(fmt.Sprintf("workers=%d/whole", n), func(b *testing.B) {
			for b.Loop() {
				_ = tab.Snapshot()
			}
		})
		b.Run(fmt.Sprintf("workers=%d/model", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				_ = tab.SnapshotModel(fmt.Sprintf("model-%d", i%50))
				i++
			}
		})
	}
}

// The per-IP bound on admitted peers spares this machine's own processes
// (a swarm on one host, a test harness), as gossipsub's colocation
// penalty does; every other address, private ones included, is bounded.
func TestPerIPBoundSparesLoopback(t *testing.T) {
	for _, tc := range []struct {
		ip   string
		want int
	}{
		{"127.0.0.1", 5},
		{"::1", 5},
		{"10.9.9.9", 2},
		{"203.0.113.7", 2},
		{"2001:db8::1", 2},
	} {
		t.Run(tc.ip, func(t *testing.T) {
			clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
			tab := newPeerTable(testPeerID(t), 100, clk.now)
			tab.lim = tableLimits{pending: 10, perForwarder: 10, perIP: 2}
			for range 5 {
				p := testPeerID(t)
				tab.offer(p, ann(1, time.Minute), clk.now(), origin{via: p, viaIP: "10.0.0.1"})
				tab.prove(p, tc.ip)
			}
			if got := tab.Len(); got != tc.want {
				t.Fatalf("%d of 5 peers at %s admitted, want %d", got, tc.ip, tc.want)
			}
		})
	}
}
