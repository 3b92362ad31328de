package node_test

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/discovery/hostiletest"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func hostileQuery(ctx context.Context, n *node.Node) (*router.Result, error) {
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello", Params: &pb.Params{MaxTokens: 20}}
	return n.Router().Query(ctx, req, func(*pb.Event) error { return nil })
}

// joinHostile starts a hostile peer connected to victim and announcing
// the demo model as itself, with perfect health and a 1 ms TTFT: the
// router's first choice, until it learns better.
func joinHostile(t *testing.T, ctx context.Context, s *swarmtest.Swarm, victim *node.Node) *hostiletest.Peer {
	t.Helper()
	h := hostiletest.New(t, victim.SwarmName())
	if err := h.Connect(ctx, peer.AddrInfo{ID: victim.ID(), Addrs: victim.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := h.AnnounceSelf(ctx, "demo"); err != nil {
			t.Fatal(err)
		}
		if _, ok := victim.Discovery().Table().Get(h.H.ID()); ok {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatal("the hostile worker never reached the victim's table")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Workers that accept and stall, stream without end, fail a model they
// announce, never answer, or answer TIMEOUT at once (a clock ahead): the
// router demotes them within a few
// queries and every query is answered by an honest worker.
func TestHostileWorkers(t *testing.T) {
	cases := []struct {
		name string
		b    hostiletest.Behaviour
	}{
		{"stall", hostiletest.Stall},
		{"endless output", hostiletest.Endless},
		{"errors for its model", hostiletest.Fail},
		{"silent", hostiletest.Silent},
		{"timeouts at once", hostiletest.EarlyTimeout},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := swarmtest.New(t, swarmtest.Clients(1),
				swarmtest.NodeOptions(node.WithRouterOptions(router.WithStallTimeout(time.Second))))
			victim := s.Clients[0]
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			bad := joinHostile(t, ctx, s, victim)
			bad.Serve(tc.b)
			start := time.Now()
			const queries = 30
			for i := range queries {
				res, err := hostileQuery(ctx, victim)
				if err != nil {
					t.Fatalf("query %d failed: %v", i, err)
				}
				if res.Peer == bad.H.ID() {
					t.Fatalf("query %d answered by the hostile worker", i)
				}
				// Keep announcing, as a liar would.
				_ = bad.AnnounceSelf(ctx, "demo")
			}
			got := bad.Queries.Load()
			t.Logf("%s: %d queries answered in %s; the hostile worker got %d of them", tc.name, queries, time.Since(start).Round(time.Millisecond), got)
			// Banned after a few (3 failures open the breaker; endless
			// output bans at once), then at most a trial per back-off.
			if got > 6 {
				t.Fatalf("the hostile worker got %d of %d queries", got, queries)
			}
		})
	}
}

// One hostile host floods the announce topic with 3000 announcements
// signed by fresh keys while the victim routes queries: none of the fakes
// becomes routable, the table and the quarantine stay bounded, and every
// query is answered.
func TestHostileSybilFlood(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Clients(1))
	victim := s.Clients[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bad := hostiletest.New(t, victim.SwarmName())
	if err := bad.Connect(ctx, peer.AddrInfo{ID: victim.ID(), Addrs: victim.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	before := victim.Discovery().Table().Len()
	var wg sync.WaitGroup
	var sent int
	var floodErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Loopback port 1: nobody listens there.
		sent, floodErr = bad.FloodFreshKeys(ctx, 3000, "demo", 0, ma.StringCast("/ip4/127.0.0.1/tcp/1"))
	}()
	const queries = 100
	failed := 0
	start := time.Now()
	for range queries {
		if _, err := hostileQuery(ctx, victim); err != nil {
			failed++
			t.Logf("query failed: %v", err)
		}
	}
	elapsed := time.Since(start)
	wg.Wait()
	if floodErr != nil {
		t.Fatal(floodErr)
	}
	time.Sleep(time.Second) // what was in flight lands
	tab := victim.Discovery().Table()
	t.Logf("%d fake announcements; %d/%d queries answered in %s; table %d → %d, quarantined %d", sent, queries-failed, queries, elapsed.Round(time.Millisecond), before, tab.Len(), tab.Quarantined())
	if failed > 0 {
		t.Fatalf("%d of %d queries failed during the flood", failed, queries)
	}
	if tab.Len() > before+1 { // the hostile host itself may announce
		t.Fatalf("table grew from %d to %d during the flood", before, tab.Len())
	}
	if q := tab.Quarantined(); q > discovery.DefaultMaxPerForwarder {
		t.Fatalf("%d in quarantine, over the forwarder's share %d", q, discovery.DefaultMaxPerForwarder)
	}
}

// Hundreds of idle query streams opened at a worker (a slowloris): its
// goroutines and memory stay bounded, and it still answers honest
// queries meanwhile.
func TestHostileIdleStreams(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Clients(1), swarmtest.Workers(1))
	w := s.Workers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bad := hostiletest.New(t, w.SwarmName())
	if err := bad.Connect(ctx, peer.AddrInfo{ID: w.ID(), Addrs: w.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	g0 := runtime.NumGoroutine()
	const tries = 600
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	opened := bad.OpenIdleStreams(sctx, w.ID(), protocol.QueryProtocol(w.SwarmName()), tries)
	time.Sleep(500 * time.Millisecond)
	res, err := hostileQuery(ctx, s.Clients[0])
	if err != nil {
		t.Fatalf("honest query during the idle stream flood: %v", err)
	}
	if res.Peer != w.ID() {
		t.Fatalf("answered by %s, want the worker", res.Peer)
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	g1 := runtime.NumGoroutine()
	// Both ends run in this process: each open stream costs a handful of
	// goroutines here in all (muxer, handler, the hostile side).
	perStream := float64(g1-g0) / float64(max(opened, 1))
	heap := int64(m1.HeapInuse) - int64(m0.HeapInuse)
	t.Logf("idle streams: %d of %d opened; goroutines %d → %d (%.1f per stream, both ends); heap in use %+d KiB", opened, tries, g0, g1, perStream, heap>>10)
	if opened >= tries {
		t.Fatalf("all %d idle streams were let in: no per-peer bound", tries)
	}
	if g1-g0 > 8*opened+200 {
		t.Fatalf("goroutines grew by %d for %d streams", g1-g0, opened)
	}
	if heap > 256<<20 {
		t.Fatal(fmt.Sprintf("heap grew by %d MiB", heap>>20))
	}
}
