package discovery

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/discovery/hostiletest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// scoreWatch keeps the latest gossipsub scores seen by a node's inspector.
type scoreWatch chan map[peer.ID]float64

func (w scoreWatch) option() Option {
	return WithScoreInspect(func(m map[peer.ID]float64) {
		select { // keep only the latest
		case <-w:
		default:
		}
		w <- m
	}, 50*time.Millisecond)
}

// waitScores waits until cond holds for the scores.
func (w scoreWatch) wait(t *testing.T, what string, cond func(map[peer.ID]float64) bool) {
	t.Helper()
	deadline := time.After(waitLimit)
	var last map[peer.ID]float64
	for {
		select {
		case m := <-w:
			if cond(m) {
				return
			}
			last = m
		case <-deadline:
			t.Fatalf("timed out waiting for %s; scores %v", what, last)
		}
	}
}

func hostileCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	t.Cleanup(cancel)
	return ctx
}

// A peer that publishes valid announcements of its own far too often is
// rejected beyond its allowance, and graylisted by peer scoring: on the
// swarm topic, and on a model's topic read by a node without the swarm
// view.
func TestHostileTooFrequentGraylisted(t *testing.T) {
	for _, tc := range []struct {
		name  string
		topic string
		opts  []Option
	}{
		{"swarm topic", protocol.AnnounceTopic(testSwarm), nil},
		{"model topic", protocol.ModelTopic(testSwarm, "spam"), []Option{WithSwarmView(false), WithWatch("spam")}},
	} {
		t.Run(tc.name, func(t *testing.T) { testTooFrequentGraylisted(t, tc.topic, tc.opts...) })
	}
}

func testTooFrequentGraylisted(t *testing.T, topic string, opts ...Option) {
	scores := make(scoreWatch, 1)
	hv := newHost(t)
	victim := newDiscovery(t, hv, append([]Option{scores.option(), WithAnnounceRate(100*time.Millisecond, 5)}, opts...)...)
	ctx := hostileCtx(t)
	rogue := hostiletest.NewOn(t, testSwarm, topic)
	if err := rogue.Connect(ctx, info(hv)); err != nil {
		t.Fatal(err)
	}
	const sent = 200
	var last uint64
	for range sent {
		a := hostiletest.Announce("spam", rogue.NextSeq())
		last = a.GetSeq()
		data, _ := proto.Marshal(a)
		if err := rogue.PublishRaw(ctx, data); err != nil {
			t.Fatal(err)
		}
	}
	scores.wait(t, "the flooder graylisted", func(m map[peer.ID]float64) bool { return m[rogue.H.ID()] < graylistThreshold })
	e, ok := victim.Table().Get(rogue.H.ID())
	if !ok {
		t.Fatal("the flooder's first announcements never reached the table")
	}
	// The burst of 5 and a few refills were accepted; the rest not.
	if e.Announce.GetSeq() == last {
		t.Fatalf("the last of %d announcements in a burst was accepted", sent)
	}
	// The victim's counters say what happened: announcements refused
	// as the author's own flood, none throttled on a quiet node.
	tr := victim.Traffic()
	if tr.Rejected == 0 || tr.Rejected+tr.Delivered > sent || tr.Throttled != 0 || tr.Undeliverable != 0 {
		t.Fatalf("the victim's gossip counters after a flood of %d: %+v", sent, tr)
	}
	t.Logf("flooder score graylisted; its entry holds seq %d of the %d published (last %d); victim counted %d rejected, %d delivered", e.Announce.GetSeq(), sent, last, tr.Rejected, tr.Delivered)
}

// One host relays announcements of thousands of fresh keys (a Sybil): none
// of them becomes visible or routable, quarantine holds at most the
// forwarder's share, and an honest worker known only through gossip still
// joins the table once the prober has reached it.
func TestHostileSybilFloodBounded(t *testing.T) {
	hv, hub, hw := newHost(t), newHost(t), newHost(t)
	const perForwarder = 32
	victim := newDiscovery(t, hv, WithQuarantineLimits(100, perForwarder, 0))
	hubD := newDiscovery(t, hub)
	worker := newDiscovery(t, hw)
	ctx := hostileCtx(t)
	// The victim and the worker know only the hub: the worker reaches
	// the victim through gossip alone, with the addresses it announces.
	for _, h := range []*Discovery{victim, worker} {
		if err := h.h.Connect(ctx, info(hub)); err != nil {
			t.Fatal(err)
		}
	}
	waitTopicPeer(t, hubD.PubSub(), hv.ID())
	waitTopicPeer(t, hubD.PubSub(), hw.ID())

	rogue := hostiletest.New(t, testSwarm)
	if err := rogue.Connect(ctx, info(hv)); err != nil {
		t.Fatal(err)
	}
	// Loopback port 1: nobody listens, a dial fails at once.
	dead := ma.StringCast("/ip4/127.0.0.1/tcp/1")
	const fakes = 2000
	sent, err := rogue.FloodFreshKeys(ctx, fakes, "demo", 0, dead)
	if err != nil {
		t.Fatal(err)
	}
	a := workerAnnounce("demo")
	wa := hw.Addrs()
	for _, m := range wa {
		a.Addrs = append(a.Addrs, m.Bytes())
	}
	heartbeat(t, worker, "demo", 200*time.Millisecond)
	// heartbeat publishes workerAnnounce without addrs; publish one with.
	if err := worker.Publish(ctx, a); err != nil {
		t.Fatal(err)
	}
	waitTable(t, victim, "the honest worker admitted", func(es []Entry) bool { return has(es, hw.ID()) })
	// Let the flood settle, then count.
	time.Sleep(time.Second)
	for _, e := range victim.Table().Snapshot() {
		if e.Peer != hv.ID() && e.Peer != hw.ID() && e.Peer != hub.ID() && e.Peer != rogue.H.ID() {
			t.Fatalf("a fake worker %s is visible in the table", e.Peer)
		}
	}
	if q := victim.Table().Quarantined(); q > perForwarder {
		t.Fatalf("%d peers in quarantine, more than the forwarder's share %d", q, perForwarder)
	}
	t.Logf("%d fake announcements sent; victim table %d visible, %d quarantined", sent, victim.Table().Len(), victim.Table().Quarantined())
}

// Hostile peers on the wire, against the per-model bound of a node
// without the swarm view: each is taken for a model with room, then
// announces a model already at its bound instead, freeing its room for
// the next. The node drops each mover (no room, and it is no better than
// those kept), so it keeps as many workers of that model as its bound,
// however many hop over.
func TestHostileModelHopBounded(t *testing.T) {
	const bound, hops = 2, 4
	hv := newHost(t)
	victim := newDiscovery(t, hv, WithSwarmView(false), WithMaxPerModel(bound), WithWatch("a", "b"))
	ctx := hostileCtx(t)
	topicA, topicB := protocol.ModelTopic(testSwarm, "a"), protocol.ModelTopic(testSwarm, "b")
	kept := func(model string) int { return len(victim.Table().keptOf(model)) }
	publish := func(p *hostiletest.Peer, topic *pubsub.Topic, model string) { publishAs(t, ctx, p, topic, model) }
	holdBound(t, ctx, victim, hv, topicB, "b", bound)
	for i := range hops {
		mover := hostiletest.NewOn(t, testSwarm, topicA)
		if err := mover.Connect(ctx, info(hv)); err != nil {
			t.Fatal(err)
		}
		publish(mover, mover.Topic, "a")
		waitTable(t, victim, "the mover taken for a", func(es []Entry) bool { return has(es, mover.H.ID()) })
		tb, err := mover.PS.Join(topicB)
		if err != nil {
			t.Fatal(err)
		}
		sub, err := tb.Subscribe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(sub.Cancel)
		waitTopicPeerOn(t, mover.PS, hv.ID(), topicB)
		publish(mover, tb, "b")
		waitTable(t, victim, "the mover dropped", func(es []Entry) bool { return !has(es, mover.H.ID()) })
		if n := kept("b"); n != bound {
			t.Fatalf("hop %d: %d workers of b kept, want the bound %d", i+1, n, bound)
		}
	}
	t.Logf("%d peers hopped from a to b; the node keeps %d of b, %d of a", hops, kept("b"), kept("a"))
}

// publishAs publishes on topic p's own announcement of models.
func publishAs(t *testing.T, ctx context.Context, p *hostiletest.Peer, topic *pubsub.Topic, models ...string) {
	t.Helper()
	a := hostiletest.Announce(models[0], p.NextSeq(), p.H.Addrs()...)
	for _, m := range models[1:] {
		mi := proto.Clone(a.Models[0]).(*pb.ModelInfo)
		mi.Name = m
		a.Models = append(a.Models, mi)
	}
	data, err := proto.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	if err := topic.Publish(ctx, data); err != nil {
		t.Fatal(err)
	}
}

// holdBound has n peers announce model on topic to the victim, and waits
// until it keeps them all.
func holdBound(t *testing.T, ctx context.Context, victim *Discovery, hv host.Host, topic, model string, n int) {
	t.Helper()
	for range n {
		holder := hostiletest.NewOn(t, testSwarm, topic)
		if err := holder.Connect(ctx, info(hv)); err != nil {
			t.Fatal(err)
		}
		publishAs(t, ctx, holder, holder.Topic, model)
		waitTable(t, victim, "a holder of "+model+" taken", func(es []Entry) bool { return has(es, holder.H.ID()) })
	}
}

// Hostile peers on the wire pad an announcement of a model at its bound
// with made-up model names, which the node does not watch and which would
// always have room: the node counts only the models it watches, so it
// takes none of them, and ignores their announcements (forwarding none).
func TestHostileMadeUpModelsBounded(t *testing.T) {
	const bound, padders = 2, 3
	hv := newHost(t)
	victim := newDiscovery(t, hv, WithSwarmView(false), WithMaxPerModel(bound), WithWatch("b"))
	ctx := hostileCtx(t)
	topicB := protocol.ModelTopic(testSwarm, "b")
	holdBound(t, ctx, victim, hv, topicB, "b", bound)
	ignored := victim.Traffic().Ignored
	for i := range padders {
		p := hostiletest.NewOn(t, testSwarm, topicB)
		if err := p.Connect(ctx, info(hv)); err != nil {
			t.Fatal(err)
		}
		publishAs(t, ctx, p, p.Topic, "b", fmt.Sprintf("made-up-%d-a", i), fmt.Sprintf("made-up-%d-b", i))
	}
	deadline := time.Now().Add(waitLimit)
	for victim.Traffic().Ignored < ignored+padders {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d padded announcements ignored", victim.Traffic().Ignored-ignored, padders)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(victim.Table().keptOf("b")); n != bound {
		t.Fatalf("%d workers of b kept after %d padded announcements, want the bound %d", n, padders, bound)
	}
}

// has reports whether es holds p's entry.
func has(es []Entry, p peer.ID) bool {
	return slices.ContainsFunc(es, func(e Entry) bool { return e.Peer == p })
}

// The IP colocation penalty (P6) is configured, and valid for gossipsub.
// It cannot be seen on the wire here: gossipsub leaves loopback addresses
// out of P6, and tests run on loopback.
func TestIPColocationParams(t *testing.T) {
	_, lan, _ := net.ParseCIDR("10.0.0.0/8")
	cases := []struct {
		name      string
		threshold int
		white     []*net.IPNet
		weight    float64
	}{
		{"default", DefaultIPColocationThreshold, nil, ipColocationWeight},
		{"with whitelist", 4, []*net.IPNet{lan}, ipColocationWeight},
		{"off", 0, nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, th := scoreParams([]string{"topic"}, tc.threshold, tc.white)
			if p.IPColocationFactorWeight != tc.weight || (tc.weight != 0 && p.IPColocationFactorThreshold != tc.threshold) || len(p.IPColocationFactorWhitelist) != len(tc.white) {
				t.Fatalf("P6 = weight %v threshold %d whitelist %v", p.IPColocationFactorWeight, p.IPColocationFactorThreshold, p.IPColocationFactorWhitelist)
			}
			if _, err := pubsub.NewGossipSub(context.Background(), newHost(t), pubsub.WithPeerScore(p, th)); err != nil {
				t.Fatalf("gossipsub refuses the params: %v", err)
			}
			// 9 peers beyond the threshold at one IP: graylisted.
			if tc.weight != 0 && 81*tc.weight >= graylistThreshold {
				t.Fatalf("9 colocated peers beyond the threshold score %v, not graylisted", 81*tc.weight)
			}
		})
	}
}
