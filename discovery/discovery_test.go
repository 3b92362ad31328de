package discovery

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Generous: tests must pass on a loaded 2-core machine. They end as soon
// as what they wait for happens.
const waitLimit = 60 * time.Second

const testSwarm = "disc-test"

// debugLogs has the package log at debug level for the rest of t: go test
// shows a package's output only when it fails, so a rare failure comes
// with the discovery's own account of it, and a pass costs nothing.
func debugLogs(t *testing.T) {
	t.Helper()
	if err := logging.SetLogLevel("mtor/discovery", "debug"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = logging.SetLogLevel("mtor/discovery", "error") })
}

var (
	tcpAndQUIC = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}
	quicOnly   = []string{"/ip4/127.0.0.1/udp/0/quic-v1"}
)

func newHost(t *testing.T) host.Host {
	t.Helper()
	return newHostOn(t, tcpAndQUIC)
}

func newHostOn(t *testing.T, listen []string) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings(listen...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

func info(h host.Host) peer.AddrInfo {
	return peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}
}

func newDiscovery(t *testing.T, h host.Host, opts ...Option) *Discovery {
	t.Helper()
	base := []Option{
		WithSwarm(testSwarm),
		WithPingInterval(200 * time.Millisecond),
		WithSweepInterval(50 * time.Millisecond),
	}
	d, err := New(context.Background(), h, append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// waitTable waits, woken by table events, until cond holds for d's table.
func waitTable(t *testing.T, d *Discovery, what string, cond func([]Entry) bool) {
	t.Helper()
	ch, cancel := d.Table().Subscribe(256)
	defer cancel()
	// A backstop tick: a slow subscriber may have missed the event that
	// made cond true, and RTT updates emit no events.
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(waitLimit)
	for !cond(d.Table().Snapshot()) {
		select {
		case <-ch:
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; table: %v", what, d.Table().Snapshot())
		}
	}
}

// waitEvent waits for an event matching match on ch.
func waitEvent(t *testing.T, ch <-chan Event, what string, match func(Event) bool) Event {
	t.Helper()
	deadline := time.After(waitLimit)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("event channel closed waiting for %s", what)
			}
			if match(ev) {
				return ev
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// waitTopicPeer waits until ps sees p subscribed to the announce topic, so
// that a publish reaches it.
func waitTopicPeer(t *testing.T, ps *pubsub.PubSub, p peer.ID) {
	t.Helper()
	waitTopicPeerOn(t, ps, p, protocol.AnnounceTopic(testSwarm))
}

// waitTopicPeerOn waits until p is a peer of ps on topic.
func waitTopicPeerOn(t *testing.T, ps *pubsub.PubSub, p peer.ID, topic string) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !slices.Contains(ps.ListPeers(topic), p) {
		if time.Now().After(deadline) {
			t.Fatalf("peer %s never joined topic %s", p, topic)
		}
		time.Sleep(20 * time.Millisecond) // pubsub offers no event for this
	}
}

func workerAnnounce(model string) *pb.Announce {
	return &pb.Announce{
		Roles:   []string{"worker"},
		Version: "test",
		Models:  []*pb.ModelInfo{{Name: model, Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Backend: "demo"}},
		Load:    &pb.Load{MaxConcurrency: 2},
		Health:  100,
	}
}

func modelOf(e Entry) string {
	if ms := e.Announce.GetModels(); len(ms) > 0 {
		return ms[0].GetName()
	}
	return ""
}

// heartbeat publishes an announcement every interval until the test ends
// or stop is called, as the node's announcer will.
func heartbeat(t *testing.T, d *Discovery, model string, every time.Duration) (stop func()) {
	return publishEvery(t, d, func() *pb.Announce { return workerAnnounce(model) }, every)
}

// Nodes that know only the first one: every node's table ends up holding
// all announcements, each with its own model. Once over TCP and QUIC
// (libp2p picks), once over QUIC alone.
func TestAnnouncementsReachAll(t *testing.T) {
	for _, tc := range []struct {
		name   string
		n      int
		listen []string
	}{
		{"tcp+quic", 5, tcpAndQUIC},
		{"quic", 3, quicOnly},
	} {
		t.Run(tc.name, func(t *testing.T) { testAnnouncementsReachAll(t, tc.n, tc.listen) })
	}
}

func testAnnouncementsReachAll(t *testing.T, n int, listen []string) {
	hosts := make([]host.Host, n)
	nodes := make([]*Discovery, n)
	for i := range n {
		hosts[i] = newHostOn(t, listen)
		var opts []Option
		if i > 0 {
			opts = append(opts, WithBootstrap([]peer.AddrInfo{info(hosts[0])}))
		}
		nodes[i] = newDiscovery(t, hosts[i], opts...)
	}
	for i, d := range nodes {
		heartbeat(t, d, fmt.Sprintf("model-%d", i), 300*time.Millisecond)
	}
	for i, d := range nodes {
		waitTable(t, d, fmt.Sprintf("node %d to see all %d", i, n), func(es []Entry) bool {
			if len(es) != n {
				return false
			}
			for _, e := range es {
				j := slices.IndexFunc(hosts, func(h host.Host) bool { return h.ID() == e.Peer })
				if j < 0 || modelOf(e) != fmt.Sprintf("model-%d", j) || e.Self != (j == i) {
					return false
				}
			}
			return true
		})
	}
	// RTT is measured for connected peers (at least the bootstrap link).
	waitTable(t, nodes[1], "an RTT to node 0", func(es []Entry) bool {
		i := slices.IndexFunc(es, func(e Entry) bool { return e.Peer == hosts[0].ID() })
		return i >= 0 && es[i].RTT > 0
	})
}

func TestPublishStampsAndInsertsSelf(t *testing.T) {
	h := newHost(t)
	d := newDiscovery(t, h, WithAnnounceTTL(7*time.Second))
	before := time.Now()
	a1 := workerAnnounce("m")
	if err := d.Publish(context.Background(), a1); err != nil {
		t.Fatal(err)
	}
	e, ok := d.Table().Get(h.ID())
	if !ok || !e.Self || e.Announce.GetSeq() != a1.GetSeq() {
		t.Fatalf("own entry %+v, ok %v", e, ok)
	}
	if a1.GetSeq() < uint64(before.UnixMilli())*1000 {
		t.Errorf("seq %d not seeded from the clock (%d ms)", a1.GetSeq(), before.UnixMilli())
	}
	if a1.GetTtlMs() != 7000 || a1.GetTimeUnixMs() < before.UnixMilli() {
		t.Errorf("ttl %d ms, time %d", a1.GetTtlMs(), a1.GetTimeUnixMs())
	}
	a2 := workerAnnounce("m")
	if err := d.Publish(context.Background(), a2); err != nil {
		t.Fatal(err)
	}
	if a2.GetSeq() <= a1.GetSeq() {
		t.Fatalf("seq not increasing: %d then %d", a1.GetSeq(), a2.GetSeq())
	}
	if e, _ := d.Table().Get(h.ID()); e.Announce.GetSeq() != a2.GetSeq() {
		t.Fatalf("own entry seq %d, want %d", e.Announce.GetSeq(), a2.GetSeq())
	}
	bad := workerAnnounce("m")
	bad.Health = 500
	if err := d.Publish(context.Background(), bad); err == nil {
		t.Fatal("publishing an invalid announce succeeded")
	}
}

// An announcement that is not renewed expires everywhere, with a Leave.
func TestExpiryLeave(t *testing.T) {
	ha, hb := newHost(t), newHost(t)
	a := newDiscovery(t, ha, WithAnnounceTTL(protocol.MinAnnounceTTL))
	b := newDiscovery(t, hb, WithBootstrap([]peer.AddrInfo{info(ha)}))
	waitTopicPeer(t, a.PubSub(), hb.ID())
	evB, cancelB := b.Table().Subscribe(64)
	defer cancelB()
	evA, cancelA := a.Table().Subscribe(64)
	defer cancelA()

	if err := a.Publish(context.Background(), workerAnnounce("m")); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, evB, "join of a at b", func(e Event) bool { return e.Kind == Join && e.Peer == ha.ID() })
	ev := waitEvent(t, evB, "leave of a at b", func(e Event) bool { return e.Kind == Leave && e.Peer == ha.ID() })
	if ev.Reason != ReasonExpired {
		t.Fatalf("leave reason %q, want %q", ev.Reason, ReasonExpired)
	}
	ev = waitEvent(t, evA, "a's own entry expiring", func(e Event) bool { return e.Kind == Leave && e.Peer == ha.ID() })
	if ev.Reason != ReasonExpired {
		t.Fatalf("own leave reason %q, want %q", ev.Reason, ReasonExpired)
	}
}

// Closing a peer's host removes it from the table long before its TTL.
func TestDisconnectLeave(t *testing.T) {
	ha, hb := newHost(t), newHost(t)
	a := newDiscovery(t, ha, WithAnnounceTTL(protocol.MaxAnnounceTTL))
	b := newDiscovery(t, hb, WithBootstrap([]peer.AddrInfo{info(ha)}))
	evB, cancel := b.Table().Subscribe(64)
	defer cancel()
	heartbeat(t, a, "m", 300*time.Millisecond)
	waitEvent(t, evB, "join of a", func(e Event) bool { return e.Kind == Join && e.Peer == ha.ID() })

	start := time.Now()
	if err := a.Close(); err != nil {
		t.Logf("close discovery: %v", err)
	}
	if err := ha.Close(); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, evB, "leave of a", func(e Event) bool { return e.Kind == Leave && e.Peer == ha.ID() })
	if ev.Reason != ReasonDisconnected {
		t.Fatalf("leave reason %q, want %q", ev.Reason, ReasonDisconnected)
	}
	if _, ok := b.Table().Get(ha.ID()); ok {
		t.Fatal("closed peer still in the table")
	}
	t.Logf("left %s after close (ttl was %s)", time.Since(start).Round(time.Millisecond), protocol.MaxAnnounceTTL)
}

func TestProvideFindProviders(t *testing.T) {
	const n = 4
	hosts := make([]host.Host, n)
	nodes := make([]*Discovery, n)
	for i := range n {
		hosts[i] = newHost(t)
		var opts []Option
		if i > 0 {
			opts = append(opts, WithBootstrap([]peer.AddrInfo{info(hosts[0])}))
		}
		if i == n-1 {
			// The finder is a DHT client, as a NAT'd bridge would be.
			opts = append(opts, WithDHTMode(dht.ModeClient))
		}
		nodes[i] = newDiscovery(t, hosts[i], opts...)
	}
	// Provide needs peers in the routing table; Bootstrap (also run by New
	// in the background) puts the join peer there once identify is done.
	waitRoutingTables(t, nodes...)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := nodes[1].Provide(ctx, "llama-3"); err != nil {
		t.Fatal(err)
	}
	if err := nodes[2].Provide(ctx, "llama-3"); err != nil {
		t.Fatal(err)
	}
	got, err := nodes[3].FindProviders(ctx, "llama-3", 10)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]peer.ID, 0, len(got))
	for _, ai := range got {
		ids = append(ids, ai.ID)
	}
	if len(ids) != 2 || !slices.Contains(ids, hosts[1].ID()) || !slices.Contains(ids, hosts[2].ID()) {
		t.Fatalf("providers of llama-3 = %v, want nodes 1 and 2 (%s, %s)", ids, hosts[1].ID(), hosts[2].ID())
	}
	// A provider finds the other but never itself.
	got, err = nodes[1].FindProviders(ctx, "llama-3", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].ID != hosts[2].ID() {
		t.Fatalf("node 1 found %v, want only node 2", got)
	}
	// Another model has no providers; the lookup ends by itself.
	if got, err := nodes[3].FindProviders(ctx, "other", 10); err != nil || len(got) != 0 {
		t.Fatalf("providers of other = %v, %v; want none", got, err)
	}
	if err := nodes[1].Provide(ctx, ""); err == nil {
		t.Fatal("providing an empty model name succeeded")
	}
}

// Unreachable join peers make Bootstrap fail but not New.
func TestBootstrapUnreachable(t *testing.T) {
	gone := newHost(t)
	dead := info(gone)
	_ = gone.Close()
	h := newHost(t)
	d := newDiscovery(t, h, WithBootstrap([]peer.AddrInfo{dead}), WithDialTimeout(time.Second))
	if err := d.Bootstrap(context.Background()); err == nil {
		t.Fatal("bootstrap through a closed peer succeeded")
	}
}

func TestModelCID(t *testing.T) {
	a, err := modelCID("s", "m")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := modelCID("s", "m")
	c, _ := modelCID("other", "m")
	if !a.Equals(b) || a.Equals(c) {
		t.Fatalf("model cids: %s %s %s", a, b, c)
	}
	if a.Prefix().Codec != 0x55 || a.Prefix().MhType != 0x12 {
		t.Fatalf("cid %s: want raw codec and sha2-256", a)
	}
}

func TestOptionsValidate(t *testing.T) {
	h := newHost(t)
	for name, o := range map[string]Option{
		"bad swarm":      WithSwarm("Not A Swarm"),
		"ttl too short":  WithAnnounceTTL(time.Millisecond),
		"ttl too long":   WithAnnounceTTL(time.Hour),
		"zero entries":   WithMaxEntries(0),
		"zero sweep":     WithSweepInterval(0),
		"negative queue": WithGossipQueues(-1, 0),
	} {
		if d, err := New(context.Background(), h, o); err == nil {
			_ = d.Close()
			t.Errorf("%s: New succeeded", name)
		}
	}
}

// A rogue peer runs plain gossipsub on the announce topic, with no
// validator of its own, and sends what an honest node never would. Its
// messages are signed (StrictSign), so only our validator stands between
// them and the table, and peer scoring makes rejects cost the rogue.
func TestValidatorOnTheWire(t *testing.T) {
	hh, hr := newHost(t), newHost(t)
	scores := make(chan map[peer.ID]float64, 1)
	inspect := func(o *config) error {
		o.scoreInspect = func(m map[peer.ID]float64) {
			select { // keep only the latest
			case <-scores:
			default:
			}
			scores <- m
		}
		o.scoreInspectPeriod = 50 * time.Millisecond
		return nil
	}
	honest := newDiscovery(t, hh, inspect)
	rps, err := pubsub.NewGossipSub(context.Background(), hr, pubsub.WithFloodPublish(true))
	if err != nil {
		t.Fatal(err)
	}
	rtopic, err := rps.Join(protocol.AnnounceTopic(testSwarm))
	if err != nil {
		t.Fatal(err)
	}
	rsub, err := rtopic.Subscribe() // to be a topic peer of the honest node
	if err != nil {
		t.Fatal(err)
	}
	defer rsub.Cancel()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := hr.Connect(ctx, info(hh)); err != nil {
		t.Fatal(err)
	}
	waitTopicPeer(t, rps, hh.ID())
	ev, stop := honest.Table().Subscribe(64)
	defer stop()

	send := func(data []byte) {
		t.Helper()
		if err := rtopic.Publish(ctx, data); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	send(marshal(t, validAnnounce(now, 5)))
	waitEvent(t, ev, "join of the rogue", func(e Event) bool { return e.Kind == Join && e.Peer == hr.ID() })

	// Two rejects (score -40, above the graylist), two ignores, then a
	// newer valid one. A date an hour ahead is ignored (this clock may be
	// the one behind); with an invalid field as well it is rejected. Had
	// either future-dated one (seq 1000, 1001) been accepted, seq 6 would
	// be stale and never show.
	send([]byte("not a protobuf \xff\xff\xff"))
	send(marshal(t, validAnnounce(now.Add(time.Hour), 1000)))
	badTTL := validAnnounce(now.Add(time.Hour), 1001)
	badTTL.TtlMs = 1
	send(marshal(t, badTTL))
	send(marshal(t, validAnnounce(now, 3)))
	send(marshal(t, validAnnounce(now, 6)))
	waitEvent(t, ev, "update of the rogue", func(e Event) bool { return e.Kind == Update && e.Peer == hr.ID() })
	if e, ok := honest.Table().Get(hr.ID()); !ok || e.Announce.GetSeq() != 6 {
		t.Fatalf("rogue entry %+v, want seq 6", e)
	}

	// A third reject (oversized) graylists the rogue.
	oversized := validAnnounce(now, 2000)
	for i := range 200 {
		oversized.Models = append(oversized.Models, &pb.ModelInfo{Name: fmt.Sprintf("%0100d", i), Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}})
	}
	send(marshal(t, oversized))
	deadline := time.After(waitLimit)
	for {
		select {
		case m := <-scores:
			if m[hr.ID()] < graylistThreshold {
				if e, _ := honest.Table().Get(hr.ID()); e.Announce.GetSeq() != 6 {
					t.Fatalf("rogue entry seq %d after rejects, want 6", e.Announce.GetSeq())
				}
				return
			}
		case <-deadline:
			t.Fatalf("rogue never graylisted after 3 rejected messages")
		}
	}
}

// waitRoutingTables waits until each of ds has a peer in its DHT routing
// table: Provide and FindProviders need one, and Bootstrap puts the join
// peer there only once identify is done.
func waitRoutingTables(t *testing.T, ds ...*Discovery) {
	t.Helper()
	for i, d := range ds {
		deadline := time.Now().Add(waitLimit)
		for d.DHT().RoutingTable().Size() == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("node %d: empty routing table", i)
			}
			time.Sleep(20 * time.Millisecond) // the DHT offers no event for this
		}
	}
}

// TestReconnectingPeerKeepsItsPlace: a peer whose connections this node
// replaces on purpose (WithReconnecting) keeps its table entry through
// the disconnection when it is back once the replacing ends, and leaves
// if it is not.
func TestReconnectingPeerKeepsItsPlace(t *testing.T) {
	for _, back := range []bool{true, false} {
		t.Run(fmt.Sprintf("back %v", back), func(t *testing.T) {
			ha, hb := newHost(t), newHost(t)
			var replacing atomic.Bool
			a := newDiscovery(t, ha, WithAnnounceTTL(protocol.MaxAnnounceTTL))
			b := newDiscovery(t, hb, WithBootstrap([]peer.AddrInfo{info(ha)}), WithReconnecting(func(p peer.ID) bool { return p == ha.ID() && replacing.Load() }))
			evB, cancel := b.Table().Subscribe(64)
			defer cancel()
			heartbeat(t, a, "m", 300*time.Millisecond)
			waitEvent(t, evB, "join of a", func(e Event) bool { return e.Kind == Join && e.Peer == ha.ID() })
			replacing.Store(true)
			if err := hb.Network().ClosePeer(ha.ID()); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond) // the disconnection's event is handled
			if _, ok := b.Table().Get(ha.ID()); !ok {
				t.Fatal("the peer left the table while being reconnected")
			}
			if back {
				if err := hb.Connect(t.Context(), info(ha)); err != nil {
					t.Fatal(err)
				}
			}
			replacing.Store(false)
			time.Sleep(time.Second) // past a look after the replacing ends
			// a's heartbeats would bring it back at once: what counts is
			// whether it left.
			left := false
			for drained := false; !drained; {
				select {
				case e := <-evB:
					left = left || e.Kind == Leave && e.Peer == ha.ID()
				default:
					drained = true
				}
			}
			if back && left {
				t.Fatal("the peer left the table although it was back")
			}
			if !back && !left {
				t.Fatal("the peer did not leave the table although it did not come back")
			}
		})
	}
}
