package discovery

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/discovery/hostiletest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// testCatalogEvery is the catalogue period of these tests: the shortest
// allowed, so that expiry (3 periods) is seen in seconds.
const testCatalogEvery = time.Second

// waitCatalog polls d's catalogue until cond holds.
func waitCatalog(t *testing.T, d *Discovery, what string, cond func([]CatalogModel) bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond(d.Catalog()) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; catalog: %v", what, d.Catalog())
		}
		time.Sleep(50 * time.Millisecond) // the catalogue offers no event
	}
}

func catalogNames(ms []CatalogModel) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Name
	}
	return out
}

// A node without the swarm view learns, from a view node's catalogue, the
// models of workers it never routed to, without holding the workers; the
// models leave once the view node stops.
func TestCatalogLearnt(t *testing.T) {
	hosts := make([]host.Host, 5)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	cat := WithCatalog(testCatalogEvery)
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	view := newDiscovery(t, hosts[0], cat)
	for i, model := range []string{"alpha", "alpha", "beta"} {
		heartbeat(t, newDiscovery(t, hosts[1+i], boot, cat, WithSwarmView(false)), model, 300*time.Millisecond)
	}
	bridge := newDiscovery(t, hosts[4], boot, cat, WithSwarmView(false))
	notReading := newDiscovery(t, newHost(t), boot, cat, WithSwarmView(false), WithCatalogReader(false))
	waitTable(t, view, "the view to hold the 3 workers", func(es []Entry) bool { return len(es) == 3 })

	waitCatalog(t, bridge, "alpha and beta in the catalogue", func(ms []CatalogModel) bool {
		return slices.Equal(catalogNames(ms), []string{"alpha", "beta"})
	})
	m, ok := bridge.CatalogModel("alpha")
	if !ok || !slices.Equal(m.Types, []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}) || m.Workers != 2 {
		t.Fatalf("alpha in the catalogue: %+v, %v", m, ok)
	}
	if _, ok := bridge.CatalogModel("gamma"); ok {
		t.Fatal("a model nobody serves is in the catalogue")
	}
	if es := bridge.Table().Snapshot(); len(es) != 0 {
		t.Fatalf("the catalogue made the bridge hold %d workers", len(es))
	}
	if got := bridge.Watching(); len(got) != 0 {
		t.Fatalf("the catalogue made the bridge watch %v", got)
	}
	if got := view.Catalog(); got != nil {
		t.Fatalf("a view node lists a catalogue: %v", got)
	}
	if got := notReading.Catalog(); got != nil || slices.Contains(notReading.PubSub().GetTopics(), protocol.CatalogTopic(testSwarm)) {
		t.Fatalf("a node told not to read the catalogue lists %v, topics %v", got, notReading.PubSub().GetTopics())
	}

	// The view node stops: its catalogue expires 3 periods after the last.
	stopped := time.Now()
	if err := view.Close(); err != nil {
		t.Fatal(err)
	}
	waitCatalog(t, bridge, "the catalogue to expire", func(ms []CatalogModel) bool { return len(ms) == 0 })
	if took := time.Since(stopped); took > catalogTTLPeriods*testCatalogEvery+2*time.Second {
		t.Fatalf("catalogue expired %s after its publisher stopped", took)
	}
}

// countCatalogs counts, per author, the catalogues published on the
// catalogue topic that a plain subscriber (a hostiletest peer) receives.
func countCatalogs(t *testing.T, p *hostiletest.Peer) (counts func() map[peer.ID]int) {
	t.Helper()
	sub, err := p.Topic.Subscribe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Cancel)
	ch := make(chan peer.ID, 1024)
	go func() {
		for {
			msg, err := sub.Next(context.Background())
			if err != nil {
				close(ch)
				return
			}
			ch <- msg.GetFrom()
		}
	}()
	got := map[peer.ID]int{}
	return func() map[peer.ID]int {
		for {
			select {
			case p, ok := <-ch:
				if !ok {
					return got
				}
				got[p]++
				continue
			default:
			}
			return got
		}
	}
}

// Several view nodes that see the same models do not each publish once a
// period: one does, the others hear it and keep quiet. The traffic a node
// without the view pays for the catalogue is measured and logged.
func TestCatalogSuppression(t *testing.T) {
	const views = 4
	hosts := make([]host.Host, views+2)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	cat := WithCatalog(testCatalogEvery)
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	var vs []*Discovery
	for i := range views {
		opts := []Option{cat}
		if i > 0 {
			opts = append(opts, boot)
		}
		vs = append(vs, newDiscovery(t, hosts[i], opts...))
	}
	w := newDiscovery(t, hosts[views], boot, cat, WithSwarmView(false))
	bridge := newDiscovery(t, hosts[views+1], boot, cat, WithSwarmView(false))
	heartbeat(t, w, "alpha", 300*time.Millisecond)
	for _, v := range vs {
		waitTable(t, v, "each view to hold the worker", func(es []Entry) bool { return len(es) == 1 })
	}
	waitCatalog(t, bridge, "alpha in the catalogue", func(ms []CatalogModel) bool { return len(ms) == 1 })

	obs := hostiletest.NewOn(t, testSwarm, protocol.CatalogTopic(testSwarm))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := obs.Connect(ctx, info(hosts[0])); err != nil {
		t.Fatal(err)
	}
	counts := countCatalogs(t, obs)
	time.Sleep(2 * time.Second) // the observer's join triggers a publication; let it pass
	counts()
	base := counts()
	before := map[peer.ID]int{}
	for p, n := range base {
		before[p] = n
	}
	tr0 := bridge.Traffic()
	const periods = 6
	time.Sleep(periods * testCatalogEvery)
	tr1 := bridge.Traffic()
	total := 0
	for p, n := range counts() {
		total += n - before[p]
	}
	// Without suppression: views × periods (24). With it, one a period,
	// give or take a race at a jittered boundary.
	if total < periods/2 || total > periods+3 {
		t.Fatalf("%d view nodes published %d catalogues in %d periods, want about %d", views, total, periods, periods)
	}
	secs := float64(periods*testCatalogEvery) / float64(time.Second)
	t.Logf("%d catalogues in %d periods from %d view nodes; the bridge's gossip meanwhile: %.0f B/s in, %.0f B/s out (one model, period %s)",
		total, periods, views, float64(tr1.BytesIn-tr0.BytesIn)/secs, float64(tr1.BytesOut-tr0.BytesOut)/secs, testCatalogEvery)
}

func validCatalog(names ...string) *pb.Catalog {
	c := &pb.Catalog{TimeUnixMs: time.Now().UnixMilli(), TtlMs: 3000}
	for _, n := range names {
		c.Models = append(c.Models, &pb.CatalogModel{Name: n, Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Workers: 1})
	}
	return c
}

func manyNames(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	return out
}

// The validator refuses every catalogue outside the bounds, penalising
// the peer that delivered it, and ignores stale or too frequent ones.
func TestCatalogCheck(t *testing.T) {
	now := time.Now()
	author, from := peer.ID("author"), peer.ID("forwarder")
	marshal := func(c *pb.Catalog) []byte {
		b, err := proto.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	with := func(f func(c *pb.Catalog)) []byte {
		c := validCatalog("m")
		f(c)
		return marshal(c)
	}
	for _, tc := range []struct {
		name string
		data []byte
		want pubsub.ValidationResult
	}{
		{"valid", marshal(validCatalog("a", "b")), pubsub.ValidationAccept},
		{"512 models", marshal(validCatalog(manyNames("m", protocol.MaxCatalogModels)...)), pubsub.ValidationAccept},
		{"513 models", marshal(validCatalog(manyNames("m", protocol.MaxCatalogModels+1)...)), pubsub.ValidationReject},
		{"oversized", make([]byte, protocol.MaxCatalog+1), pubsub.ValidationReject},
		{"not a catalog", []byte{0xff, 0xff, 0xff}, pubsub.ValidationReject},
		{"empty name", with(func(c *pb.Catalog) { c.Models[0].Name = "" }), pubsub.ValidationReject},
		{"control in name", with(func(c *pb.Catalog) { c.Models[0].Name = "a\nb" }), pubsub.ValidationReject},
		{"long name", with(func(c *pb.Catalog) { c.Models[0].Name = strings.Repeat("x", protocol.MaxModelName+1) }), pubsub.ValidationReject},
		{"twice", marshal(validCatalog("a", "a")), pubsub.ValidationReject},
		{"huge count", with(func(c *pb.Catalog) { c.Models[0].Workers = 1 << 30 }), pubsub.ValidationReject},
		{"no workers", with(func(c *pb.Catalog) { c.Models[0].Workers = 0 }), pubsub.ValidationReject},
		{"no types", with(func(c *pb.Catalog) { c.Models[0].Types = nil }), pubsub.ValidationReject},
		{"unknown type", with(func(c *pb.Catalog) { c.Models[0].Types = []pb.QueryType{99} }), pubsub.ValidationReject},
		{"17 features", with(func(c *pb.Catalog) { c.Models[0].Features = manyNames("f", 17) }), pubsub.ValidationReject},
		{"long feature", with(func(c *pb.Catalog) { c.Models[0].Features = []string{strings.Repeat("f", 33)} }), pubsub.ValidationReject},
		{"future", with(func(c *pb.Catalog) { c.TimeUnixMs = now.Add(time.Hour).UnixMilli() }), pubsub.ValidationIgnore},
		{"future, no workers", with(func(c *pb.Catalog) { c.TimeUnixMs, c.Models[0].Workers = now.Add(time.Hour).UnixMilli(), 0 }), pubsub.ValidationReject},
		{"no time", with(func(c *pb.Catalog) { c.TimeUnixMs = 0 }), pubsub.ValidationReject},
		{"ttl too long", with(func(c *pb.Catalog) { c.TtlMs = uint32(protocol.MaxCatalogTTL/time.Millisecond) + 1 }), pubsub.ValidationReject},
		{"ttl zero", with(func(c *pb.Catalog) { c.TtlMs = 0 }), pubsub.ValidationReject},
		{"expired in transit", with(func(c *pb.Catalog) { c.TimeUnixMs = now.Add(-time.Hour).UnixMilli() }), pubsub.ValidationIgnore},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCatalog(testCatalogEvery)
			res, _, err := c.check(author, from, tc.data, now)
			if res != tc.want {
				t.Fatalf("result %s (%v), want %s", resultName(res), err, resultName(tc.want))
			}
		})
	}

	t.Run("stale and too frequent", func(t *testing.T) {
		c := newCatalog(testCatalogEvery)
		cat := validCatalog("a")
		cat.TimeUnixMs = now.UnixMilli()
		res, got, _ := c.check(author, author, marshal(cat), now)
		if res != pubsub.ValidationAccept {
			t.Fatalf("first: %s", resultName(res))
		}
		c.store(author, got, now)
		if res, _, _ := c.check(author, from, marshal(cat), now); res != pubsub.ValidationIgnore {
			t.Fatalf("same time again: %s, want ignore", resultName(res))
		}
		// A burst of newer ones, straight from their author: the bucket
		// runs dry and the author is penalised.
		var last pubsub.ValidationResult
		for i := range 2 * catalogBurst {
			cat.TimeUnixMs = now.Add(time.Duration(i+1) * time.Millisecond).UnixMilli()
			last, _, _ = c.check(author, author, marshal(cat), now)
		}
		if last != pubsub.ValidationReject {
			t.Fatalf("a burst of %d from its author: %s, want reject", 2*catalogBurst, resultName(last))
		}
	})
}

// What one hostile peer can make a node hold through the catalogue is
// bounded: invalid catalogues are refused on the wire, valid ones keep at
// most maxCatalogPublishers publishers of at most MaxCatalogModels models,
// and they expire.
func TestCatalogHostile(t *testing.T) {
	victim := newDiscovery(t, newHost(t), WithCatalog(testCatalogEvery), WithSwarmView(false))
	hp := hostiletest.NewOn(t, testSwarm, protocol.CatalogTopic(testSwarm))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := hp.Connect(ctx, info(victim.h)); err != nil {
		t.Fatal(err)
	}
	newKey := func() crypto.PrivKey {
		t.Helper()
		key, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return key
	}
	publishBy := func(key crypto.PrivKey, c *pb.Catalog) {
		t.Helper()
		data, err := proto.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := hp.PublishAs(ctx, key, data); err != nil {
			t.Fatal(err)
		}
	}
	publishAs := func(c *pb.Catalog) { t.Helper(); publishBy(newKey(), c) }
	// Two refused (a reject costs the hostile peer score, and three would
	// have it graylisted, which would hide the rest of the test), then a
	// valid marker from another key: once it arrives, the refused ones
	// would have been there before it.
	bad := validCatalog(manyNames("long", protocol.MaxCatalogModels+1)...)
	publishAs(bad)
	huge := validCatalog("huge")
	huge.Models[0].Workers = 1 << 31
	publishAs(huge)
	publishAs(validCatalog("marker"))
	waitCatalog(t, victim, "the marker", func(ms []CatalogModel) bool { return slices.Contains(catalogNames(ms), "marker") })
	if got := catalogNames(victim.Catalog()); !slices.Equal(got, []string{"marker"}) {
		t.Fatalf("the victim lists %d models (first %v), want only the marker", len(got), got[:min(len(got), 3)])
	}

	// A Sybil: 24 keys, each with 512 names. At most 16 publishers are
	// kept, so at most 16 × 512 names, and they leave with their TTL.
	const sybils = 24
	sybil := func(i int) *pb.Catalog {
		return validCatalog(manyNames(fmt.Sprintf("sybil%02d", i), protocol.MaxCatalogModels)...)
	}
	last := newKey()
	for i := range sybils - 1 {
		publishAs(sybil(i))
	}
	publishBy(last, sybil(sybils-1))
	// The victim's reader holds 16 catalogues in its buffer, and gossipsub
	// drops what a full one cannot take: on a busy machine the flood can
	// overrun it (CI lost the last Sybil's so). The last Sybil publishes
	// again each period, as its author would, until the victim has it.
	lastName := fmt.Sprintf("sybil%02d-0000", sybils-1)
	sent, times := time.Now(), 1
	waitCatalog(t, victim, "the last Sybil's names", func(ms []CatalogModel) bool {
		if slices.Contains(catalogNames(ms), lastName) {
			return true
		}
		if time.Since(sent) >= testCatalogEvery {
			publishBy(last, sybil(sybils-1))
			sent, times = time.Now(), times+1
		}
		return false
	})
	t.Logf("the last Sybil's catalogue arrived after %d publication(s)", times)
	if n := len(victim.Catalog()); n > maxCatalogPublishers*protocol.MaxCatalogModels {
		t.Fatalf("the victim lists %d models, bound %d", n, maxCatalogPublishers*protocol.MaxCatalogModels)
	}
	victim.cat.mu.Lock()
	kept := len(victim.cat.entries)
	victim.cat.mu.Unlock()
	if kept > maxCatalogPublishers {
		t.Fatalf("the victim keeps %d catalogues, bound %d", kept, maxCatalogPublishers)
	}
	waitCatalog(t, victim, "the hostile catalogues to expire", func(ms []CatalogModel) bool { return len(ms) == 0 })
}

func TestCatalogOption(t *testing.T) {
	for _, tc := range []struct {
		every time.Duration
		ok    bool
	}{
		{0, true}, {time.Second, true}, {DefaultCatalogEvery, true}, {200 * time.Second, true},
		{-time.Second, false}, {500 * time.Millisecond, false}, {201 * time.Second, false},
	} {
		var c config
		if err := WithCatalog(tc.every)(&c); (err == nil) != tc.ok {
			t.Errorf("WithCatalog(%s): %v, want ok %v", tc.every, err, tc.ok)
		}
	}
}

// Newcomers joining the topic one after another each get the catalogue,
// yet the view node publishes for them at most about once per a third of
// a period, not once per newcomer.
func TestCatalogChurn(t *testing.T) {
	const every = 3 * time.Second
	cat := WithCatalog(every)
	vh := newHost(t)
	boot := WithBootstrap([]peer.AddrInfo{info(vh)})
	view := newDiscovery(t, vh, cat)
	heartbeat(t, newDiscovery(t, newHost(t), boot, cat, WithSwarmView(false)), "alpha", 300*time.Millisecond)
	waitTable(t, view, "the view to hold the worker", func(es []Entry) bool { return len(es) == 1 })

	obs := hostiletest.NewOn(t, testSwarm, protocol.CatalogTopic(testSwarm))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := obs.Connect(ctx, info(vh)); err != nil {
		t.Fatal(err)
	}
	counts := countCatalogs(t, obs)
	time.Sleep(every / 2) // the observer's own join
	before := counts()[vh.ID()]

	const joiners = 12
	start := time.Now()
	var readers []*Discovery
	for range joiners {
		readers = append(readers, newDiscovery(t, newHost(t), boot, cat, WithSwarmView(false)))
		time.Sleep(every / 12)
	}
	for _, r := range readers {
		waitCatalog(t, r, "each newcomer to learn alpha", func(ms []CatalogModel) bool { return len(ms) == 1 })
	}
	took := time.Since(start)
	published := counts()[vh.ID()] - before
	// One per eventQuiet (every/3) at most, plus the periodic ones and
	// one at the edge of the window.
	bound := int(took/(every/catalogEventDiv)) + int(took/every) + 2
	t.Logf("%d newcomers in %s: %d catalogues published (bound %d)", joiners, took.Round(time.Millisecond), published, bound)
	if published > bound || published >= joiners {
		t.Fatalf("%d catalogues published for %d newcomers in %s, want at most %d", published, joiners, took, bound)
	}
}
