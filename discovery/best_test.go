package discovery

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// wk describes a worker's announcement for the replacement tests.
type wk struct {
	busy     uint32 // queries in flight, of 2 slots
	ttft     uint32 // announced p50 TTFT, ms (0: the default)
	health   uint32
	draining bool
	relay    bool   // announces the relay role too
	inc      uint64 // incarnation (0: none)
	models   []string
}

func (w wk) ann(seq uint64) *pb.Announce {
	a := ann(seq, time.Minute)
	a.Load = &pb.Load{MaxConcurrency: 2, InFlight: w.busy}
	a.Health = w.health
	a.Draining = w.draining
	a.Incarnation = w.inc
	if w.relay {
		a.Roles = []string{"worker", "relay"}
	}
	for _, m := range w.models {
		a.Models = append(a.Models, &pb.ModelInfo{Name: m, P50TtftMs: w.ttft})
	}
	return a
}

// Under the per-model bound, a newcomer takes the place of the worst kept
// worker of its model when it is clearly better (protocol.ClearlyBetter),
// and only then: near-equal workers never take turns, a worker is never
// replaced if it would leave a model of its own without its bound (it
// would be taken again) or alone, and draining or unusable workers go first.
func TestTableKeepsTheBest(t *testing.T) {
	idle := wk{health: 100, models: []string{"a"}}
	full := wk{busy: 2, health: 100, models: []string{"a"}} // score 700 against idle's 100
	type step struct {
		name     string
		p        int // worker index
		w        wk
		unusable []int           // marked unusable before the step
		measured map[int]float64 // the router's TTFT (ms) of kept workers, told before the step
		taken    bool
		kept     []int // workers kept after the step
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"the third, clearly better, replaces the worst", []step{
			{name: "w0 full", p: 0, w: full, taken: true, kept: []int{0}},
			{name: "w1 idle", p: 1, w: idle, taken: true, kept: []int{0, 1}},
			{name: "w2 idle replaces w0", p: 2, w: idle, taken: true, kept: []int{1, 2}},
			{name: "w0 back, still full: not taken", p: 0, w: full, kept: []int{1, 2}},
		}},
		{"near-equal workers do not swap", []step{
			{name: "w0", p: 0, w: idle, taken: true, kept: []int{0}},
			{name: "w1", p: 1, w: wk{ttft: 110, health: 100, models: []string{"a"}}, taken: true, kept: []int{0, 1}},
			{name: "w2 a bit faster", p: 2, w: wk{ttft: 60, health: 100, models: []string{"a"}}, kept: []int{0, 1}},
			{name: "w1 a bit slower now (120)", p: 1, w: wk{ttft: 120, health: 100, models: []string{"a"}}, taken: true, kept: []int{0, 1}},
			{name: "w2 again", p: 2, w: wk{ttft: 60, health: 100, models: []string{"a"}}, kept: []int{0, 1}},
			{name: "w3 as w0", p: 3, w: idle, kept: []int{0, 1}},
			{name: "w2 again, twice", p: 2, w: wk{ttft: 60, health: 100, models: []string{"a"}}, kept: []int{0, 1}},
		}},
		{"draining and unusable workers go first", []step{
			{name: "w0", p: 0, w: idle, taken: true, kept: []int{0}},
			{name: "w1", p: 1, w: idle, taken: true, kept: []int{0, 1}},
			{name: "w1 drains", p: 1, w: wk{health: 100, draining: true, models: []string{"a"}}, taken: true, kept: []int{0, 1}},
			{name: "w2, full, replaces the draining w1", p: 2, w: full, taken: true, kept: []int{0, 2}},
			{name: "a draining newcomer replaces nobody", p: 3, w: wk{health: 100, draining: true, models: []string{"a"}}, kept: []int{0, 2}},
			{name: "w0 found unusable: w3 replaces it", p: 3, w: full, unusable: []int{0}, taken: true, kept: []int{2, 3}},
		}},
		{"a worker that serves several models", []step{
			{name: "w0 of a and b, alone for b", p: 0, w: wk{busy: 2, health: 100, models: []string{"a", "b"}}, taken: true, kept: []int{0}},
			{name: "w1 of a", p: 1, w: full, taken: true, kept: []int{0, 1}},
			{name: "w2 replaces w1, not w0, the only worker of b", p: 2, w: idle, taken: true, kept: []int{0, 2}},
			{name: "w3 would replace w0, but b would have room", p: 3, w: idle, kept: []int{0, 2}},
			{name: "w4 of b", p: 4, w: wk{health: 100, models: []string{"b"}}, taken: true, kept: []int{0, 2, 4}},
			{name: "w3 of a and b replaces w0", p: 3, w: wk{health: 100, models: []string{"a", "b"}}, taken: true, kept: []int{2, 3, 4}},
		}},
		// The router's measurements judge kept workers: one slower than
		// it claims goes for a newcomer, one that gives what it claims
		// stays although a newcomer claims more.
		{"kept workers judged on what the router measured", []step{
			{name: "w0 claims 50 ms", p: 0, w: wk{ttft: 50, health: 100, models: []string{"a"}}, taken: true, kept: []int{0}},
			{name: "w1 claims 50 ms", p: 1, w: wk{ttft: 50, health: 100, models: []string{"a"}}, taken: true, kept: []int{0, 1}},
			{name: "w2 claims as much: not taken", p: 2, w: wk{ttft: 50, health: 100, models: []string{"a"}}, kept: []int{0, 1}},
			{name: "w0 measured at 400 ms: w2 replaces it", p: 2, w: wk{ttft: 50, health: 100, models: []string{"a"}}, measured: map[int]float64{0: 400}, taken: true, kept: []int{1, 2}},
			{name: "w1 and w2 measured at 40 ms: w3 claiming 15 ms replaces neither", p: 3, w: wk{ttft: 15, health: 100, models: []string{"a"}}, measured: map[int]float64{1: 40, 2: 40}, kept: []int{1, 2}},
			{name: "w2 measured at 60 ms: w3 replaces it", p: 3, w: wk{ttft: 15, health: 100, models: []string{"a"}}, measured: map[int]float64{2: 60}, taken: true, kept: []int{1, 3}},
			{name: "w1 restarts: what was measured of it is forgotten", p: 1, w: wk{ttft: 50, health: 100, inc: 2, models: []string{"a"}}, taken: true, kept: []int{1, 3}},
			{name: "w4 claiming 15 ms replaces w1 on its claim", p: 4, w: wk{ttft: 15, health: 100, models: []string{"a"}}, taken: true, kept: []int{3, 4}},
		}},
		// A node without the view finds its relays in this table: a relay
		// is kept for its role, under a bound of its own, whatever the
		// bound of the models it also serves.
		{"relays that serve a model", []step{
			{name: "w0", p: 0, w: idle, taken: true, kept: []int{0}},
			{name: "w1", p: 1, w: idle, taken: true, kept: []int{0, 1}},
			{name: "w2, a full relay of a, taken past a's bound", p: 2, w: wk{busy: 2, health: 100, relay: true, models: []string{"a"}}, taken: true, kept: []int{0, 1, 2}},
			{name: "w3, an idle relay of a", p: 3, w: wk{health: 100, relay: true, models: []string{"a"}}, taken: true, kept: []int{0, 1, 2, 3}},
			{name: "w4, a third relay: the relays' bound is reached", p: 4, w: wk{health: 100, relay: true}, kept: []int{0, 1, 2, 3}},
			{name: "w5 idle of a replaces no relay", p: 5, w: idle, kept: []int{0, 1, 2, 3}},
			{name: "w0 found unusable: w5 replaces it, not the full relay", p: 5, w: idle, unusable: []int{0}, taken: true, kept: []int{1, 2, 3, 5}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
			tab := newPeerTable(testPeerID(t), 100, clk.now)
			tab.lim.perModel = 2
			ps := make([]peer.ID, 6)
			for i := range ps {
				ps[i] = testPeerID(t)
			}
			seq := uint64(0)
			for _, s := range tt.steps {
				var marked []peer.ID
				for _, i := range s.unusable {
					marked = append(marked, ps[i])
				}
				tab.markUnusable(marked, clk.now().Add(unusableFor))
				for i, ms := range s.measured {
					tab.setMeasured(ps[i], ms)
				}
				seq++
				if got := tab.upsert(ps[s.p], s.w.ann(seq), clk.now()); got != s.taken {
					t.Fatalf("%s: upsert = %v, want %v", s.name, got, s.taken)
				}
				var want []peer.ID
				for _, i := range s.kept {
					want = append(want, ps[i])
				}
				slices.Sort(want)
				var got []peer.ID
				for _, e := range tab.Snapshot() {
					got = append(got, e.Peer)
				}
				if !slices.Equal(got, want) {
					t.Fatalf("%s: kept %v, want %v", s.name, got, want)
				}
				clk.add(time.Second)
			}
		})
	}
}

// A newcomer known only from gossip that would replace a kept worker is
// quarantined (and forwarded) rather than ignored; one that would not is
// ignored. Once proven, it replaces the worst.
func TestTableReplaceFromQuarantine(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	tab := newPeerTable(testPeerID(t), 100, clk.now)
	tab.lim.perModel = 2
	w0, w1, near, better := testPeerID(t), testPeerID(t), testPeerID(t), testPeerID(t)
	tab.upsert(w0, wk{health: 100, models: []string{"a"}}.ann(1), clk.now())
	tab.upsert(w1, wk{busy: 2, health: 100, models: []string{"a"}}.ann(1), clk.now())
	gossiped := origin{via: w0, viaIP: "10.0.0.1"}
	if tab.wouldTake(near, gossiped, wk{busy: 2, health: 100, models: []string{"a"}}.ann(1)) {
		t.Fatal("wouldTake a gossiped worker no better than the kept ones")
	}
	a := wk{health: 100, models: []string{"a"}}.ann(1)
	if !tab.wouldTake(better, gossiped, a) {
		t.Fatal("wouldTake refused a gossiped worker clearly better than a kept one")
	}
	tab.offer(better, a, clk.now(), gossiped)
	if tab.Quarantined() != 1 {
		t.Fatalf("quarantined %d, want 1", tab.Quarantined())
	}
	if !tab.prove(better, "10.0.0.2") {
		t.Fatal("the proven newcomer was not admitted")
	}
	if _, ok := tab.Get(w1); ok {
		t.Fatal("the full worker is still kept")
	}
	if _, ok := tab.Get(better); !ok {
		t.Fatal("the newcomer is not kept")
	}
}

// drainingAnnounce is workerAnnounce, draining.
func drainingAnnounce(model string) *pb.Announce {
	a := workerAnnounce(model)
	a.Draining = true
	return a
}

// On real hosts: a node without the swarm view keeps the 2 workers it
// found first; a third worker of the model comes later, which the node is
// not connected to. When the 2 kept drain and the router asks for more
// (SeekWorkers), the node looks the providers up again, past those kept,
// dials the third, which announces to it and replaces a draining one: it
// becomes routable, long before the drained ones' entries would expire.
func TestSeekWorkersWhenKeptUnusable(t *testing.T) {
	// Twice on CI the third never reached the router's table in 60 s
	// (it takes under a second here, also under load). The second time
	// the state below showed the router connected to the third and
	// reading its gossip, but the third not knowing that the router
	// reads topic a: gossipsub had dropped the router's subscriptions
	// when the closed connection's writer died, after the new
	// connection's hello (see rejoin.go). Nodes repair that link; so the
	// discoveries here serve the member protocol, as a node's do.
	debugLogs(t)
	hosts := make([]host.Host, 5)
	for i := range hosts {
		hosts[i] = newHost(t)
		serveMember(hosts[i])
	}
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	asNode := WithMemberProtocol(testMember)
	// Entries outlive the test unless replaced or disconnected.
	long := WithAnnounceTTL(protocol.MaxAnnounceTTL)
	view := newDiscovery(t, hosts[0], asNode)
	workers := []*Discovery{
		newDiscovery(t, hosts[1], boot, asNode, long, WithSwarmView(false)),
		newDiscovery(t, hosts[2], boot, asNode, long, WithSwarmView(false)),
		newDiscovery(t, hosts[3], boot, asNode, long, WithSwarmView(false)),
	}
	// No wait between look-ups: the first one, which found the first two,
	// was just before.
	noRedialWait := func(c *config) error { c.redialEvery = 0; return nil }
	router := newDiscovery(t, hosts[4], boot, asNode, WithSwarmView(false), WithMaxPerModel(2), noRedialWait)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		r, w := hosts[4], hosts[3].ID()
		t.Logf("router and third worker: %s on %d connection(s); router among the third's peers of topic a (those it publishes to): %v; third among the router's presence peers: %v; look-ups %d",
			r.Network().Connectedness(w), len(r.Network().ConnsToPeer(w)), slices.Contains(topicPeers(workers[2], "a"), r.ID()),
			slices.Contains(router.presence.ListPeers(), w), router.lookups.Load())
	})
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	waitRoutingTables(t, append([]*Discovery{view, router}, workers...)...)
	stops := make([]func(), len(workers))
	for i, w := range workers[:2] {
		if err := w.Provide(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		stops[i] = heartbeat(t, w, "a", 300*time.Millisecond)
	}
	if _, err := router.FindProviders(ctx, "a", 8); err != nil {
		t.Fatal(err)
	}
	first := []peer.ID{hosts[1].ID(), hosts[2].ID()}
	slices.Sort(first)
	waitTable(t, router, "the router to hold the first 2 workers", func(es []Entry) bool {
		return len(es) == 2 && es[0].Peer == first[0] && es[1].Peer == first[1]
	})
	third := workers[2]
	if err := third.Provide(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	heartbeat(t, third, "a", 300*time.Millisecond)
	// Its Provide may have connected it to the router (a DHT server):
	// cut that, so that only a look-up brings it.
	if err := hosts[4].Network().ClosePeer(hosts[3].ID()); err != nil {
		t.Fatal(err)
	}
	// The first two drain: their last announcement says so.
	for i, w := range workers[:2] {
		stops[i]()
		if err := w.Publish(ctx, drainingAnnounce("a")); err != nil {
			t.Fatal(err)
		}
	}
	waitTable(t, router, "both kept workers draining", func(es []Entry) bool {
		return len(es) == 2 && es[0].Announce.GetDraining() && es[1].Announce.GetDraining()
	})
	if hosts[4].Network().Connectedness(hosts[3].ID()) == network.Connected {
		t.Log("the router is connected to the third worker again (the DHT): the look-up may not be what brings it")
	}
	before := router.lookups.Load()
	router.SeekWorkers("a", nil)
	// A router seeks again with each query that finds no usable worker:
	// so does this one, every 2 s, in case a look-up under the load of
	// the full suite came back empty.
	seeking := make(chan struct{})
	defer close(seeking)
	go func() {
		tick := time.NewTicker(2 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-seeking:
				return
			case <-tick.C:
				router.SeekWorkers("a", nil)
			}
		}
	}()
	waitTable(t, router, "the third worker to replace a draining one", func(es []Entry) bool {
		return slices.ContainsFunc(es, func(e Entry) bool { return e.Peer == hosts[3].ID() && !e.Announce.GetDraining() })
	})
	if got := router.lookups.Load(); got <= before {
		t.Fatalf("provider look-ups %d, want more than %d", got, before)
	}
	if n := len(router.Table().Snapshot()); n != 2 {
		t.Fatalf("router holds %d workers, bound is 2", n)
	}
}

// SeekWorkers is rate-limited per model as Watch's look-ups are: a router
// that finds no usable worker on every query does not look up on each.
// topicPeers lists the peers d's gossipsub knows to read model's topic.
func topicPeers(d *Discovery, model string) []peer.ID {
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	if mt := d.topics.models[model]; mt != nil && mt.topic != nil {
		return mt.topic.ListPeers()
	}
	return nil
}

func TestSeekWorkersRateLimited(t *testing.T) {
	d := newDiscovery(t, newHost(t), WithSwarmView(false))
	d.SeekWorkers("m", nil)
	if got := d.Watching(); !slices.Equal(got, []string{"m"}) {
		t.Fatalf("watching %v after SeekWorkers, want [m]", got)
	}
	for range 3 {
		d.SeekWorkers("m", nil)
	}
	if got := d.lookups.Load(); got != 1 {
		t.Fatalf("%d provider look-ups within %s, want 1", got, redialEvery)
	}
	v := newDiscovery(t, newHost(t))
	v.SeekWorkers("m", nil)
	if got := v.lookups.Load(); got != 0 || len(v.Watching()) != 0 {
		t.Fatalf("a node with the swarm view looked up %d times, watching %v", got, v.Watching())
	}
}

// Under the per-model bound of a node without the swarm view, only the
// models it watches count: authors announcing a watched model next to
// made-up names (which always had room) neither get in past the bound nor
// keep a clearly better worker of the watched model out.
func TestBoundCountsWatchedModelsOnly(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	tab := newPeerTable(testPeerID(t), 1000, clk.now)
	tab.lim.perModel = 4
	tab.watchOnly = true
	tab.setWatched("a", true)
	honest := wk{health: 100, models: []string{"a"}}
	if !tab.upsert(testPeerID(t), honest.ann(1), clk.now()) {
		t.Fatal("the first worker of a not taken")
	}
	taken := 0
	for i := range 10 {
		slow := wk{busy: 2, ttft: 60000, models: []string{"a", fmt.Sprintf("junk%d", i)}}
		if tab.upsert(testPeerID(t), slow.ann(1), clk.now()) {
			taken++
		}
	}
	if kept := len(tab.keptOf("a")); kept != 4 || taken != 3 {
		t.Fatalf("%d workers of a kept (%d slow ones taken), want the bound of 4", kept, taken)
	}
	if !tab.upsert(testPeerID(t), honest.ann(1), clk.now()) {
		t.Fatal("a clearly better worker of a not taken in place of a slow one")
	}
	// A model nobody here watches brings nobody in.
	if tab.upsert(testPeerID(t), wk{health: 100, models: []string{"other"}}.ann(1), clk.now()) {
		t.Fatal("a worker of a model not watched was taken")
	}
}

// A kept worker that changes its models is judged as a newcomer with
// those models would be: kept while one of them has room, or in place of
// a clearly worse worker; otherwise dropped. Without this, authors taken
// one after another for a model with room could each move to a model at
// its bound, freeing the room for the next: the bound would not hold.
// Updates that keep their models are not judged again.
func TestTableModelChangeJudgedAsANewcomer(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	tab := newPeerTable(testPeerID(t), 100, clk.now)
	tab.lim.perModel = 2
	events, stop := tab.Subscribe(64)
	defer stop()
	full := wk{busy: 2, health: 100, models: []string{"b"}}
	b1, b2 := testPeerID(t), testPeerID(t)
	for _, p := range []peer.ID{b1, b2} {
		if !tab.upsert(p, full.ann(1), clk.now()) {
			t.Fatal("a worker of b with room was refused")
		}
	}
	kept := func(m string) int { return len(tab.keptOf(m)) }
	for i := range 5 {
		h := testPeerID(t)
		if !tab.upsert(h, wk{busy: 2, health: 100, models: []string{"a"}}.ann(1), clk.now()) {
			t.Fatalf("author %d: a has room, but it was refused", i)
		}
		tab.upsert(h, full.ann(2), clk.now()) // moves to b, no better than those kept
		if _, ok := tab.Get(h); ok {
			t.Fatalf("author %d moved to b, at its bound, and is still kept", i)
		}
		if kept("b") != 2 || kept("a") != 0 {
			t.Fatalf("author %d: kept %d of b, %d of a; want 2 and 0", i, kept("b"), kept("a"))
		}
	}
	reasons := map[string]int{}
	for len(events) > 0 {
		if ev := <-events; ev.Kind == Leave {
			reasons[ev.Reason]++
		}
	}
	if reasons[ReasonNoRoom] != 5 {
		t.Fatalf("leave reasons %v, want %d of %q", reasons, 5, ReasonNoRoom)
	}

	// One clearly better than a kept worker of b takes its place.
	better := testPeerID(t)
	tab.upsert(better, wk{busy: 2, health: 100, models: []string{"a"}}.ann(1), clk.now())
	tab.upsert(better, wk{health: 100, models: []string{"b"}}.ann(2), clk.now())
	if _, ok := tab.Get(better); !ok || kept("b") != 2 {
		t.Fatalf("a clearly better worker moved to b: kept %v, %d of b; want kept, 2", ok, kept("b"))
	}

	// Over the bound through another model's room (allowed, as for a
	// newcomer), an update with the same models is not judged again.
	bc := testPeerID(t)
	if !tab.upsert(bc, wk{busy: 2, health: 100, models: []string{"b", "c"}}.ann(1), clk.now()) {
		t.Fatal("an author of b and c (c has room) was refused")
	}
	if !tab.upsert(bc, wk{busy: 1, health: 100, models: []string{"b", "c"}}.ann(2), clk.now()) {
		t.Fatal("an update with the same models was refused")
	}
	if _, ok := tab.Get(bc); !ok || kept("b") != 3 {
		t.Fatalf("after its update: kept %v, %d of b; want kept, 3", ok, kept("b"))
	}
}
