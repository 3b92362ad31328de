package discovery

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// modelsAnn is an announcement of models, for table tests.
func modelsAnn(seq uint64, models ...string) *pb.Announce {
	a := ann(seq, time.Minute)
	for _, m := range models {
		a.Models = append(a.Models, &pb.ModelInfo{Name: m})
	}
	return a
}

// The per-model bound: at most K workers of a model are kept (admitted or
// quarantined); an author with one model that has room is taken; a
// departure makes room; an update moves the counts.
func TestTablePerModelBound(t *testing.T) {
	clk := &manualClock{t: time.Unix(1_700_000_000, 0)}
	self := testPeerID(t)
	tab := newPeerTable(self, 100, clk.now)
	tab.lim.perModel = 2
	a1, a2, a3, ab, q := testPeerID(t), testPeerID(t), testPeerID(t), testPeerID(t), testPeerID(t)
	steps := []struct {
		name string
		p    peer.ID
		a    *pb.Announce
		want bool
	}{
		{"first of a", a1, modelsAnn(1, "a"), true},
		{"second of a", a2, modelsAnn(1, "a"), true},
		{"third of a: over the bound", a3, modelsAnn(1, "a"), false},
		{"a and b: b has room", ab, modelsAnn(1, "a", "b"), true},
		{"self always", self, modelsAnn(1, "a"), true},
		{"known author updates", a1, modelsAnn(2, "a"), true},
	}
	for _, s := range steps {
		if got := tab.upsert(s.p, s.a, clk.now()); got != s.want {
			t.Fatalf("%s: upsert = %v, want %v", s.name, got, s.want)
		}
	}
	// A gossiped (unproven) author of a full model is neither quarantined
	// nor, through the validator, forwarded.
	gossiped := origin{via: a1, viaIP: "10.0.0.1"}
	if tab.wouldTake(q, gossiped, modelsAnn(1, "a")) {
		t.Fatal("wouldTake an author of a model already at its bound")
	}
	if !tab.wouldTake(q, gossiped, modelsAnn(1, "c")) {
		t.Fatal("wouldTake refused an author of a model with room")
	}
	tab.offer(q, modelsAnn(1, "c"), clk.now(), gossiped)
	tab.offer(testPeerID(t), modelsAnn(1, "c"), clk.now(), gossiped)
	if tab.wouldTake(testPeerID(t), gossiped, modelsAnn(1, "c")) {
		t.Fatal("quarantined authors do not count against the bound")
	}
	// a1 moves to model b: b is full (ab, a1), a still (a2, ab).
	if !tab.upsert(a1, modelsAnn(3, "b"), clk.now()) {
		t.Fatal("update refused")
	}
	if tab.upsert(testPeerID(t), modelsAnn(1, "b"), clk.now()) {
		t.Fatal("b is full after a1 moved to it, but a new worker was taken")
	}
	// ab leaves: both have room for one.
	tab.remove(ab, ReasonDisconnected)
	if !tab.upsert(a3, modelsAnn(1, "a"), clk.now()) {
		t.Fatal("a has room after ab left, but a3 was refused")
	}
	if !tab.upsert(testPeerID(t), modelsAnn(1, "b"), clk.now()) {
		t.Fatal("b has room after ab left, but a new worker was refused")
	}
	if tab.Len() != 5 {
		t.Fatalf("len = %d, want 5 (self, a1, a2, a3, one of b)", tab.Len())
	}
}

// The swarm view and per-model topics on real hosts: a node without the
// swarm view holds no worker until it routes to a model; looking up the
// model's providers makes it watch the model's topic and dial them; it
// then holds that model's workers (up to its bound), follows their
// heartbeats, and never the other model's; a node with the swarm view
// holds everyone.
func TestWatchModelLazily(t *testing.T) {
	hosts := make([]host.Host, 6)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	view := newDiscovery(t, hosts[0]) // bootstrap, with the swarm view
	workers := []*Discovery{
		newDiscovery(t, hosts[1], boot, WithSwarmView(false)),
		newDiscovery(t, hosts[2], boot, WithSwarmView(false)),
		newDiscovery(t, hosts[3], boot, WithSwarmView(false)),
		newDiscovery(t, hosts[4], boot, WithSwarmView(false)),
	}
	models := []string{"a", "a", "a", "b"}
	// No catalogue: the view node's would arrive within seconds, and this
	// test counts every message received (catalog_test.go tests it).
	router := newDiscovery(t, hosts[5], boot, WithSwarmView(false), WithMaxPerModel(2), WithCatalog(0))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	waitRoutingTables(t, append([]*Discovery{view, router}, workers...)...)
	for i, w := range workers {
		if err := w.Provide(ctx, models[i]); err != nil {
			t.Fatal(err)
		}
		heartbeat(t, w, models[i], 300*time.Millisecond)
	}
	waitTable(t, view, "the swarm view to hold all 4 workers", func(es []Entry) bool { return len(es) == 4 })
	if got := router.Watching(); len(got) != 0 {
		t.Fatalf("watching %v before any look-up", got)
	}
	time.Sleep(time.Second) // a few heartbeats, none of which may reach the router
	if es := router.Table().Snapshot(); len(es) != 0 {
		t.Fatalf("a node without the swarm view holds %d workers before routing to any", len(es))
	}
	if tr := router.Traffic(); tr.MsgsIn != 0 {
		t.Fatalf("a node without the swarm view received %d announcements before routing to any", tr.MsgsIn)
	}
	if _, err := router.FindProviders(ctx, "a", 8); err != nil {
		t.Fatal(err)
	}
	if got := router.Watching(); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("watching %v, want [a]", got)
	}
	waitTable(t, router, "the router to hold 2 workers of a", func(es []Entry) bool {
		if len(es) != 2 {
			return false
		}
		for _, e := range es {
			if modelOf(e) != "a" {
				t.Fatalf("router holds %s of model %q", e.Peer, modelOf(e))
			}
		}
		return true
	})
	// The entries are followed: they outlive their 30 s TTL only through
	// heartbeats, which we check by their seqs moving on.
	first := router.Table().Snapshot()
	waitTable(t, router, "heartbeats on the model topic", func(es []Entry) bool {
		return len(es) == 2 && es[0].Announce.GetSeq() > first[0].Announce.GetSeq() && es[1].Announce.GetSeq() > first[1].Announce.GetSeq()
	})
	if got := len(router.Table().Snapshot()); got != 2 {
		t.Fatalf("router holds %d workers, bound is 2", got)
	}
	if !slices.Contains(router.PubSub().GetTopics(), protocol.ModelTopic(testSwarm, "a")) ||
		slices.Contains(router.PubSub().GetTopics(), protocol.ModelTopic(testSwarm, "b")) {
		t.Fatalf("router's topics %v: want a's and not b's", router.PubSub().GetTopics())
	}
}

func TestWatchOptions(t *testing.T) {
	h := newHost(t)
	d := newDiscovery(t, h, WithSwarmView(false), WithWatch("x", "y"))
	if got := d.Watching(); !slices.Equal(got, []string{"x", "y"}) {
		t.Fatalf("watching %v, want [x y]", got)
	}
	if err := d.Watch(""); err == nil {
		t.Fatal("watching an empty model name: no error")
	}
	v := newDiscovery(t, newHost(t))
	if err := v.Watch("x"); err != nil || len(v.Watching()) != 0 {
		t.Fatalf("a node with the swarm view watched: %v %v", err, v.Watching())
	}
	if err := v.WatchRelays(false); err != nil || v.WatchingRelays() {
		t.Fatalf("a node with the swarm view watched relays: %v %v", err, v.WatchingRelays())
	}
	for _, o := range []Option{WithMaxPerModel(-1), WithWatch(string(make([]byte, protocol.MaxModelName+1)))} {
		if _, err := New(context.Background(), newHost(t), o); err == nil {
			t.Fatal("bad option accepted")
		}
	}
}

// At most maxWatched models are watched: a new one evicts the one looked
// up least recently, whose topic is left.
func TestWatchBounded(t *testing.T) {
	d := newDiscovery(t, newHost(t), WithSwarmView(false))
	if err := d.WatchRelays(false); err != nil {
		t.Fatal(err)
	}
	for i := range maxWatched {
		if err := d.Watch(fmt.Sprintf("m%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	// m0 is looked up again: m1 is now the least recent.
	if err := d.Watch("m0"); err != nil {
		t.Fatal(err)
	}
	if err := d.Watch("new"); err != nil {
		t.Fatal(err)
	}
	got := d.Watching()
	if len(got) != maxWatched || !slices.Contains(got, "new") || !slices.Contains(got, "m0") || slices.Contains(got, "m1") {
		t.Fatalf("watching %d models %v: want %d, with new and m0, without m1", len(got), got, maxWatched)
	}
	if slices.Contains(d.PubSub().GetTopics(), protocol.ModelTopic(testSwarm, "m1")) {
		t.Fatal("the evicted model's topic is still joined")
	}
	// The table's per-model bound counts what is watched now.
	tab := d.Table()
	tab.mu.Lock()
	counted := map[string]bool{"m0": tab.countedLocked("m0"), "new": tab.countedLocked("new"), "m1": tab.countedLocked("m1")}
	tab.mu.Unlock()
	if !counted["m0"] || !counted["new"] || counted["m1"] {
		t.Fatalf("the per-model bound counts %v: want m0 and new, not the evicted m1", counted)
	}
	// The relay topic counts against the bound neither way.
	if !d.WatchingRelays() {
		t.Fatal("watching models evicted the relay topic")
	}
	// Closed, it watches nothing.
	d.closeTopics()
	tab.mu.Lock()
	defer tab.mu.Unlock()
	if len(tab.watched) != 0 {
		t.Fatalf("after its topics closed the table still counts %d watched models", len(tab.watched))
	}
}

// publishEvery publishes mk() every interval until the test ends or stop
// is called.
func publishEvery(t *testing.T, d *Discovery, mk func() *pb.Announce, every time.Duration) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	go func() {
		defer close(done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			// A test may close d first (its peers are to see it leave).
			if err := d.Publish(ctx, mk()); err != nil && ctx.Err() == nil && d.ctx.Err() == nil {
				t.Errorf("publish: %v", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return stop
}

// The relay topic on real hosts: a node without the swarm view, joined
// only to a bootstrap that is no relay, holds no relay until it watches
// relays; then it finds the relay in the DHT, dials it, and holds its
// announcement (and no other node's), followed by its heartbeats. The
// relay topic is no watched model.
func TestWatchRelays(t *testing.T) {
	hosts := make([]host.Host, 4)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	newDiscovery(t, hosts[0]) // bootstrap, with the swarm view
	relay := newDiscovery(t, hosts[1], boot)
	worker := newDiscovery(t, hosts[2], boot, WithSwarmView(false))
	watcher := newDiscovery(t, hosts[3], boot, WithSwarmView(false))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	waitRoutingTables(t, relay, watcher)
	if err := relay.ProvideRelay(ctx); err != nil {
		t.Fatal(err)
	}
	publishEvery(t, relay, func() *pb.Announce {
		return &pb.Announce{Roles: []string{"relay"}, Load: &pb.Load{}}
	}, 300*time.Millisecond)
	heartbeat(t, worker, "a", 300*time.Millisecond)
	time.Sleep(time.Second) // a few heartbeats, none of which may reach the watcher
	if es := watcher.Table().Snapshot(); len(es) != 0 || watcher.WatchingRelays() {
		t.Fatalf("holds %d peers and watches relays (%v) before asking", len(es), watcher.WatchingRelays())
	}
	if err := watcher.WatchRelays(false); err != nil {
		t.Fatal(err)
	}
	isRelay := func(e Entry) bool { return e.Peer == hosts[1].ID() && slices.Contains(e.Announce.GetRoles(), "relay") }
	waitTable(t, watcher, "the relay's announcement", func(es []Entry) bool { return len(es) == 1 && isRelay(es[0]) })
	first, _ := watcher.Table().Get(hosts[1].ID())
	waitTable(t, watcher, "the relay's heartbeats", func(es []Entry) bool {
		return len(es) == 1 && isRelay(es[0]) && es[0].Announce.GetSeq() > first.Announce.GetSeq()
	})
	if got := watcher.Watching(); len(got) != 0 {
		t.Fatalf("watching models %v, want none: the relay topic is no model", got)
	}
	if !slices.Contains(watcher.PubSub().GetTopics(), protocol.RelayTopic(testSwarm)) {
		t.Fatalf("watcher's topics %v lack the relay topic", watcher.PubSub().GetTopics())
	}
	if slices.Contains(worker.PubSub().GetTopics(), protocol.RelayTopic(testSwarm)) {
		t.Fatal("a node that is no relay and did not ask joined the relay topic")
	}
}

// Relay dials are spaced: a call within the wait dials nothing, one after
// it dials, and afresh (a relay lost) dials at once.
func TestWatchRelaysSpacing(t *testing.T) {
	d := newDiscovery(t, newHost(t), WithSwarmView(false))
	if err := d.WatchRelays(false); err != nil {
		t.Fatal(err)
	}
	relayTopic := func() *modelTopic {
		d.topics.mu.Lock()
		defer d.topics.mu.Unlock()
		return d.topics.models[relayTopicKey]
	}
	mt := relayTopic()
	for _, tc := range []struct {
		name   string
		wait   time.Duration
		since  time.Duration // since the last dial
		afresh bool
		dials  bool
	}{
		{"within the wait", relayRedialMax, time.Second, false, false},
		{"within the wait, a relay lost", relayRedialMax, time.Second, true, true},
		{"after the wait", time.Second, 2 * time.Second, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			deadline := time.Now().Add(waitLimit)
			for {
				d.topics.mu.Lock()
				dialing := mt.dialing
				d.topics.mu.Unlock()
				if !dialing {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the last dial never ended")
				}
				time.Sleep(10 * time.Millisecond)
			}
			d.topics.mu.Lock()
			last := time.Now().Add(-tc.since)
			mt.wait, mt.dialed = tc.wait, last
			d.topics.mu.Unlock()
			if err := d.WatchRelays(tc.afresh); err != nil {
				t.Fatal(err)
			}
			d.topics.mu.Lock()
			dialed := mt.dialed.After(last)
			d.topics.mu.Unlock()
			if dialed != tc.dials {
				t.Fatalf("dialled: %v, want %v", dialed, tc.dials)
			}
		})
	}
	if relayTopic() != mt {
		t.Fatal("the relay topic was joined again")
	}
}

// A node refreshes its announcement, and tags followers, for the peers
// joining a topic it publishes on (the swarm topic, its models' topics),
// not for those joining a topic it only reads: the relay topic, which every
// node behind NAT without the swarm view reads, or a model it routes to.
// Otherwise each such join cost every other reader an announcement, and
// one join the whole swarm's.
func TestTopicJoinsOnlyWherePublished(t *testing.T) {
	hb, hw, hr, hf := newHost(t), newHost(t), newHost(t), newHost(t)
	boot := WithBootstrap([]peer.AddrInfo{info(hb)})
	newDiscovery(t, hb) // with the swarm view: joins the swarm topic
	var mu sync.Mutex
	joined := map[peer.ID]int{}
	w := newDiscovery(t, hw, boot, WithSwarmView(false), WithWatch("model-b"), WithOnTopicPeerJoin(func(p peer.ID) {
		mu.Lock()
		joined[p]++
		mu.Unlock()
	}))
	heartbeat(t, w, "model-a", 300*time.Millisecond)
	if err := w.WatchRelays(false); err != nil {
		t.Fatal(err)
	}
	// A reader: of the relay topic and of model-b, both of which w reads.
	// Connected to w here: finding it through the DHT's first walk would
	// depend on the bootstrap knowing w already, which a loaded machine
	// can delay past the walk (then the next one is 10 min away).
	r := newDiscovery(t, hr, boot, WithSwarmView(false), WithWatch("model-b"))
	if err := r.WatchRelays(false); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := hr.Connect(ctx, info(hw)); err != nil {
		t.Fatal(err)
	}
	relayTopic, topicB := protocol.RelayTopic(testSwarm), protocol.ModelTopic(testSwarm, "model-b")
	deadline := time.Now().Add(waitLimit)
	for !slices.Contains(w.PubSub().ListPeers(relayTopic), hr.ID()) || !slices.Contains(w.PubSub().ListPeers(topicB), hr.ID()) {
		if time.Now().After(deadline) {
			t.Fatalf("the reader never joined the relay topic and model-b at the worker: %v, %v",
				w.PubSub().ListPeers(relayTopic), w.PubSub().ListPeers(topicB))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Then a follower of model-a, which w publishes on: its join is
	// reported, and so are those before it on the topics w publishes on.
	newDiscovery(t, hf, boot, WithSwarmView(false), WithWatch("model-a"))
	if err := hf.Connect(ctx, info(hw)); err != nil {
		t.Fatal(err)
	}
	seen := func(p peer.ID) int {
		mu.Lock()
		defer mu.Unlock()
		return joined[p]
	}
	for seen(hf.ID()) == 0 || seen(hb.ID()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("joins reported %v, want the follower of model-a's and the bootstrap's (swarm topic)", joined)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The reader's joins came before the follower's; its events had time.
	time.Sleep(300 * time.Millisecond)
	if n := seen(hr.ID()); n != 0 {
		t.Fatalf("the reader's joins of topics the worker only reads were reported %d times", n)
	}
}
