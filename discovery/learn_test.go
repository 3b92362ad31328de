package discovery

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// A DHT operation issued while the node's only connections are still
// being identified, or are to peers without the DHT, waits for the
// routing table's first peer instead of failing at once: a worker's first
// announcement provides its models right after it joins, and a bridge's
// first query looks them up right after it joins (the CI failure of
// TestE2EWithoutSwarmView: no peer serves model "alpha").
func TestDHTWaitsForRoutingTable(t *testing.T) {
	boot := newDiscovery(t, newHost(t))
	// A peer without the DHT: a connection that never fills the table.
	plain, err := libp2p.New(libp2p.ListenAddrStrings(tcpAndQUIC...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = plain.Close() })
	provider := newDiscovery(t, newHost(t))
	finder := newDiscovery(t, newHost(t))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	joinLater := func(d *Discovery) {
		t.Helper()
		if err := d.h.Connect(ctx, info(plain)); err != nil {
			t.Fatal(err)
		}
		if n := d.DHT().RoutingTable().Size(); n != 0 {
			t.Fatalf("routing table holds %d peers before the join", n)
		}
		go func() {
			time.Sleep(300 * time.Millisecond)
			if err := d.h.Connect(ctx, info(boot.h)); err != nil {
				t.Errorf("join: %v", err)
			}
		}()
	}

	joinLater(provider)
	if err := provider.Provide(ctx, "m"); err != nil {
		t.Fatalf("provide issued before the routing table had a peer: %v", err)
	}
	joinLater(finder)
	got, err := finder.FindProviders(ctx, "m", 8)
	if err != nil {
		t.Fatal(err)
	}
	if ids := addrIDs(got); !slices.Equal(ids, []peer.ID{provider.h.ID()}) {
		t.Fatalf("look-up issued before the routing table had a peer found %v, want the provider %s", ids, provider.h.ID())
	}

	// Alone, with no connection, nothing is waited for.
	alone := newDiscovery(t, newHost(t))
	if err := alone.Provide(ctx, "m"); err == nil {
		t.Fatal("a node without any peer provided a record")
	}
	if got, err := alone.FindProviders(ctx, "m", 8); len(got) != 0 || err != nil {
		t.Fatalf("a node without any peer found %v, %v", got, err)
	}
}

// A node without the swarm view that starts watching a model looks its
// providers up again for learnWindow when it finds none: the model's
// worker may put its record a moment later. It stops early once the
// model's topic has brought a worker to its table, and stops after the
// window for a model nobody serves.
func TestFindProvidersWhileLearning(t *testing.T) {
	hosts := make([]host.Host, 4)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	view := newDiscovery(t, hosts[0])
	late := newDiscovery(t, hosts[1], boot, WithSwarmView(false))
	silent := newDiscovery(t, hosts[2], boot, WithSwarmView(false))
	bridge := newDiscovery(t, hosts[3], boot, WithSwarmView(false), WithCatalog(0))
	waitRoutingTables(t, view, late, silent, bridge)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()

	// The worker puts its record 500 ms after the look-up starts.
	go func() {
		time.Sleep(500 * time.Millisecond)
		if err := late.Provide(ctx, "late"); err != nil {
			t.Errorf("provide: %v", err)
		}
	}()
	got, err := bridge.FindProviders(ctx, "late", 8)
	if err != nil {
		t.Fatal(err)
	}
	if ids := addrIDs(got); !slices.Equal(ids, []peer.ID{hosts[1].ID()}) {
		t.Fatalf("found %v, want the worker that provided after the look-up began (%s)", ids, hosts[1].ID())
	}

	// This worker never provides, but announces on its model's topic to
	// the bridge, connected to it already (an earlier query): the look-up
	// ends as its announcement reaches the table.
	heartbeat(t, silent, "topic-only", 200*time.Millisecond)
	if err := bridge.h.Connect(ctx, info(hosts[2])); err != nil {
		t.Fatal(err)
	}
	got, err = bridge.FindProviders(ctx, "topic-only", 8)
	if err != nil || len(got) != 0 {
		t.Fatalf("look-up of a model nobody provides: %v, %v", got, err)
	}
	if !bridge.tableServes("topic-only") {
		t.Fatal("the look-up ended before the model's topic brought its worker")
	}

	// Nobody serves this model: the look-up ends after the window, not
	// at the caller's deadline, and a second one at once.
	start := time.Now()
	got, err = bridge.FindProviders(ctx, "nobody", 8)
	if err != nil || len(got) != 0 {
		t.Fatalf("look-up of an unserved model: %v, %v", got, err)
	}
	if ctx.Err() != nil {
		t.Fatal("the look-up of an unserved model ran to the caller's deadline")
	}
	first := time.Since(start)
	start = time.Now()
	if got, err := bridge.FindProviders(ctx, "nobody", 8); err != nil || len(got) != 0 {
		t.Fatalf("second look-up of an unserved model: %v, %v", got, err)
	}
	t.Logf("unserved model: first look-up %s (window %s), second %s", first.Round(time.Millisecond), learnWindow, time.Since(start).Round(time.Millisecond))
}

func addrIDs(ais []peer.AddrInfo) []peer.ID {
	ids := make([]peer.ID, 0, len(ais))
	for _, ai := range ais {
		ids = append(ids, ai.ID)
	}
	return ids
}

// A model the swarm's catalogue lists has workers: a node without the
// swarm view that finds no provider record of it keeps looking for
// learnWindowListed, not learnWindow, so the worker whose record comes
// after learnWindow (its join crossed a lossy link) is found.
func TestFindProvidersOfAListedModel(t *testing.T) {
	hosts := make([]host.Host, 3)
	for i := range hosts {
		hosts[i] = newHost(t)
	}
	boot := WithBootstrap([]peer.AddrInfo{info(hosts[0])})
	view := newDiscovery(t, hosts[0])
	late := newDiscovery(t, hosts[1], boot, WithSwarmView(false))
	bridge := newDiscovery(t, hosts[2], boot, WithSwarmView(false))
	waitRoutingTables(t, view, late, bridge)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	// A view node's catalogue lists the model (stored as the catalogue
	// topic would: its author is no node here, so no real catalogue
	// replaces it).
	now := bridge.cfg.now()
	bridge.cat.store(peer.ID("a view node"), &pb.Catalog{TimeUnixMs: now.UnixMilli(), TtlMs: 60_000,
		Models: []*pb.CatalogModel{{Name: "listed", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Workers: 1}}}, now)
	if _, ok := bridge.CatalogModel("listed"); !ok {
		t.Fatal("the catalogue does not list the model")
	}
	go func() {
		time.Sleep(learnWindow + time.Second)
		if err := late.Provide(ctx, "listed"); err != nil {
			t.Errorf("provide: %v", err)
		}
	}()
	start := time.Now()
	got, err := bridge.FindProviders(ctx, "listed", 8)
	if err != nil {
		t.Fatal(err)
	}
	if ids := addrIDs(got); !slices.Equal(ids, []peer.ID{hosts[1].ID()}) {
		t.Fatalf("found %v after %s, want the worker whose record came %s after the look-up began (%s)", ids, time.Since(start).Round(time.Millisecond), learnWindow+time.Second, hosts[1].ID())
	}
}
