package node

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// The simulated swarm: every node is a libp2p host on go-libp2p's mocknet
// (in-memory connections, no sockets) running the real discovery (DHT,
// gossipsub announce topic, validator, peer table with its quarantine and
// probes), and the workers run the real worker, demo backend and
// announcer; a client node routes with the real router over the table.
const (
	simSwarm      = "sim"
	simBootstraps = 3  // join peers, serving no model
	simModels     = 10 // worker i serves model-(i mod simModels)
)

// mocknetRange holds every mocknet host's address (mocknet's blackhole
// range, 100::/64).
var mocknetRange = &net.IPNet{IP: net.ParseIP("100::"), Mask: net.CIDRMask(64, 128)}

// TestSimSwarm runs simulated swarms of the sizes in MTOR_SIM_NODES
// (e.g. 100,300,1000; make bench-sim) and prints, per size: how long until
// every node holds every worker, the gossip bytes per node per second at
// idle, the table size and connections per node, how long until every
// node has dropped 10% of workers that died and taken in 10% that joined,
// and routing decisions (whole queries to demo workers) per second. It
// asserts only that the swarm converged: the figures are measured.
func TestSimSwarm(t *testing.T) {
	spec := os.Getenv("MTOR_SIM_NODES")
	if spec == "" {
		t.Skip("set MTOR_SIM_NODES=100,300,1000 (make bench-sim) to run the simulated swarm")
	}
	idle := 20 * time.Second
	if v := os.Getenv("MTOR_SIM_IDLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			t.Fatalf("MTOR_SIM_IDLE: %q is not a duration of at least 1s", v)
		}
		idle = d
	}
	var rows []string
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < simBootstraps+simModels || n > 5000 {
			t.Fatalf("MTOR_SIM_NODES: %q is not a size between %d and 5000", f, simBootstraps+simModels)
		}
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) { rows = append(rows, runSim(t, n, idle)) })
	}
	t.Log("\n| nodes | all hold all workers after start | gossip B/node/s (msgs/node/s) | table entries / conns per node | 10% killed: out at all | 10% joined: in at all | queries/s (c=8) | heap MB/node |\n" +
		"|---|---|---|---|---|---|---|---|\n" + strings.Join(rows, "\n"))
}

// simNode is one node of the simulated swarm.
type simNode struct {
	h      host.Host
	disc   *discovery.Discovery
	router *router.Router
	cancel context.CancelFunc
	worker bool
}

func (s *simNode) close() {
	s.cancel()
	_ = s.disc.Close()
	_ = s.h.Close()
}

func runSim(t *testing.T, n int, idle time.Duration) string {
	mn := mocknet.New()
	t.Cleanup(func() { _ = mn.Close() })
	qproto := protocol.QueryProtocol(simSwarm)
	var boots []peer.AddrInfo
	var linkMu sync.Mutex

	start := func(i int, bootstrap bool) *simNode {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		// Link the new host to every other (any node may dial any):
		// O(n) per host, where LinkAll would be O(n²).
		linkMu.Lock()
		for _, p := range mn.Peers() {
			if p != h.ID() && len(mn.LinksBetweenPeers(h.ID(), p)) == 0 {
				if _, err := mn.LinkPeers(h.ID(), p); err != nil {
					linkMu.Unlock()
					t.Fatal(err)
				}
			}
		}
		linkMu.Unlock()
		ctx, cancel := context.WithCancel(context.Background())
		s := &simNode{h: h, cancel: cancel, worker: !bootstrap}
		// As node.New does: a peer joining the topic gets our
		// announcement at once, not at the next heartbeat.
		var annp atomic.Pointer[announcer]
		// Without WithMemberProtocol: under mocknet its repair (rejoin.go)
		// took healthy gossip links for broken ones and cut them.
		d, err := discovery.New(ctx, h, discovery.WithSwarm(simSwarm), discovery.WithBootstrap(boots),
			discovery.WithMDNS(false), discovery.WithDHTMode(dht.ModeServer),
			// Mocknet puts every host in 100::/64, which gossipsub's IP
			// colocation scoring counts as one IP: exempt it.
			discovery.WithIPColocation(discovery.DefaultIPColocationThreshold, mocknetRange),
			discovery.WithOnTopicPeerJoin(func(peer.ID) {
				if a := annp.Load(); a != nil {
					a.refresh()
				}
			}))
		if err != nil {
			t.Fatal(err)
		}
		s.disc = d
		s.router = router.New(h, qproto, tableAdapter{d.Table()}, router.WithProviders(d), router.WithPeerFinder(d.DHT()))
		if !bootstrap {
			model := fmt.Sprintf("model-%d", i%simModels)
			w := worker.New([]backend.Backend{demo.New(fmt.Sprintf("w%d", i), demo.WithModel(model), demo.WithDelay(0))})
			w.Refresh(ctx)
			h.SetStreamHandler(qproto, w.HandleStream)
			ann := newAnnouncer(d, w, nil, []string{"worker"}, "sim", DefaultAnnounceInterval)
			ann.addrs = h.Addrs
			annp.Store(ann)
			go ann.run(ctx)
		}
		return s
	}

	var nodes []*simNode
	for i := range simBootstraps {
		s := start(i, true)
		nodes = append(nodes, s)
		boots = append(boots, peer.AddrInfo{ID: s.h.ID(), Addrs: s.h.Addrs()})
	}
	// Starting is done 8 at a time.
	t0 := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := simBootstraps; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			s := start(i, false)
			mu.Lock()
			nodes = append(nodes, s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, s := range nodes {
			s.close()
		}
	})
	startedIn := time.Since(t0)
	workers := func() map[peer.ID]bool {
		out := map[peer.ID]bool{}
		for _, s := range nodes {
			if s.worker {
				out[s.h.ID()] = true
			}
		}
		return out
	}
	converge := waitSim(t, nodes, workers(), nil, 10*time.Minute)
	t.Logf("n=%d: started in %s, every node holds every worker %s after the first start", n, startedIn.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	_ = converge

	// Idle: announcement traffic, table size, connections.
	tr0 := simTraffic(nodes)
	w0 := time.Now()
	time.Sleep(idle)
	tr1 := simTraffic(nodes)
	secs := time.Since(w0).Seconds()
	bps := float64(tr1.BytesIn+tr1.BytesOut-tr0.BytesIn-tr0.BytesOut) / secs / float64(len(nodes))
	mps := float64(tr1.MsgsIn-tr0.MsgsIn) / secs / float64(len(nodes))
	var entries, conns int
	for _, s := range nodes {
		entries += s.disc.Table().Len()
		conns += len(s.h.Network().Peers())
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapPerNode := float64(ms.HeapAlloc) / float64(len(nodes)) / (1 << 20)

	// Deaths: 10% of the workers at once.
	var dead []*simNode
	rng := rand.New(rand.NewPCG(uint64(n), 1))
	for _, i := range rng.Perm(len(nodes)) {
		if nodes[i].worker && len(dead) < (n-simBootstraps)/10 {
			dead = append(dead, nodes[i])
		}
	}
	gone := map[peer.ID]bool{}
	for _, s := range dead {
		gone[s.h.ID()] = true
	}
	nodes = slices.DeleteFunc(nodes, func(s *simNode) bool { return gone[s.h.ID()] })
	t1 := time.Now()
	for _, s := range dead {
		s.close()
	}
	deathIn := waitSim(t, nodes, workers(), gone, 10*time.Minute)
	_ = t1

	// Joins: as many new workers.
	t2 := time.Now()
	for i := range len(dead) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			s := start(n+i, false)
			mu.Lock()
			nodes = append(nodes, s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	waitSim(t, nodes, workers(), nil, 10*time.Minute)
	joinIn := time.Since(t2)

	// Routing: whole queries from a bootstrap node (no worker of its own)
	// to the workers of one model, 8 at a time, for 3 s.
	qps := simQueries(t, nodes[0].router, 8, 3*time.Second)

	row := fmt.Sprintf("| %d | %s | %.0f (%.1f) | %.0f / %.0f | %s | %s | %.0f | %.2f |", n, converge.Round(100*time.Millisecond),
		bps, mps, float64(entries)/float64(len(nodes)), float64(conns)/float64(len(nodes)),
		deathIn.Round(10*time.Millisecond), joinIn.Round(100*time.Millisecond), qps, heapPerNode)
	t.Log(row)
	return row
}

// waitSim waits until every node's table holds every worker in want and
// none in gone, and returns how long that took.
func waitSim(t *testing.T, nodes []*simNode, want, gone map[peer.ID]bool, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	lastLog := start
	for {
		behind := 0
		for _, s := range nodes {
			held := 0
			stale := false
			for _, e := range s.disc.Table().Snapshot() {
				if want[e.Peer] {
					held++
				}
				stale = stale || gone[e.Peer]
			}
			if held < len(want) || stale {
				behind++
			}
		}
		if behind == 0 {
			return time.Since(start)
		}
		if time.Since(start) > limit {
			t.Fatalf("%d of %d nodes still behind after %s", behind, len(nodes), limit)
		}
		if time.Since(lastLog) > 10*time.Second {
			lastLog = time.Now()
			var held, pending []int
			for _, s := range nodes {
				held = append(held, s.disc.Table().Len())
				pending = append(pending, s.disc.Table().Quarantined())
			}
			t.Logf("%s: %d of %d nodes behind; table sizes %v; quarantined %v", time.Since(start).Round(time.Second), behind, len(nodes), summary(held), summary(pending))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func simTraffic(nodes []*simNode) discovery.Traffic {
	var sum discovery.Traffic
	for _, s := range nodes {
		tr := s.disc.Traffic()
		sum.BytesIn += tr.BytesIn
		sum.BytesOut += tr.BytesOut
		sum.MsgsIn += tr.MsgsIn
	}
	return sum
}

// simQueries runs queries for model-0 through r, c at a time, for d, and
// returns the completed queries per second.
func simQueries(t *testing.T, r *router.Router, c int, d time.Duration) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var done atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range c {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				qctx, qcancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := r.Query(qctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "model-0", Prompt: "hi"},
					func(*pb.Event) error { return nil })
				qcancel()
				if err != nil {
					t.Errorf("query: %v", err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	return float64(done.Load()) / time.Since(start).Seconds()
}

// summary is min, median and max of xs.
func summary(xs []int) string {
	s := slices.Clone(xs)
	slices.Sort(s)
	return fmt.Sprintf("min %d p50 %d max %d", s[0], s[len(s)/2], s[len(s)-1])
}
