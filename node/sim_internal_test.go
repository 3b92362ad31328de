package node

import (
	"context"
	cryptorand "crypto/rand"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	basicconnmgr "github.com/libp2p/go-libp2p/p2p/net/connmgr"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	ma "github.com/multiformats/go-multiaddr"

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
	// simLimit bounds each wait for convergence (MTOR_SIM_LIMIT sets
	// another); past it the run goes on and the row says how far it got.
	simLimit = 5 * time.Minute
	// The connection manager of the workers, a sim-only setting: the
	// real node's (connLow, connHigh: 128 / 384, a minute's grace) would
	// let 1 000 workers keep up to 190 000 connections, and a mocknet
	// connection with its streams and their goroutines costs this one
	// process about 250 KB of RSS; with a minute's grace the DHT's
	// look-ups of nodes starting keep dozens more each.
	simConnLow, simConnHigh = 8, 16
	simConnGrace            = 10 * time.Second
)

// cmHost is a mocknet host with a connection manager, as newHost gives
// the real node one: mocknet builds its hosts without (libp2p's null
// manager, which never closes a connection), and the DHT's lookups then
// leave almost every pair of nodes connected, O(n²) connections in the
// process. ConnManager is what gossipsub (mesh peers), the DHT (routing
// table peers), discovery and the router tag and protect through, and
// the manager's notifiee, registered on the network, sees the
// connections it trims.
type cmHost struct {
	host.Host
	cm *basicconnmgr.BasicConnMgr
}

func (h *cmHost) ConnManager() connmgr.ConnManager { return h.cm }

// Network hands gossipsub, the DHT, discovery and the router a mocknet
// network whose Connectedness takes mocknet's read lock, as a real
// swarm's does. Mocknet's takes its write lock, and every subsystem asks
// it all the time: at 500 nodes the swarm views, which every worker
// connects to, had their lock convoyed for minutes (gossipsub's event
// loop among the waiters).
func (h *cmHost) Network() network.Network { return readLockNet{h.Host.Network()} }

type readLockNet struct{ network.Network }

func (n readLockNet) Connectedness(p peer.ID) network.Connectedness {
	if len(n.ConnsToPeer(p)) > 0 {
		return network.Connected
	}
	return network.NotConnected
}

func (h *cmHost) Close() error {
	_ = h.cm.Close()
	return h.Host.Close()
}

// mocknetRange holds every mocknet host's address (mocknet's blackhole
// range, 100::/64).
var mocknetRange = &net.IPNet{IP: net.ParseIP("100::"), Mask: net.CIDRMask(64, 128)}

// TestSimSwarm runs simulated swarms of the sizes in MTOR_SIM_NODES
// (e.g. 100,300,1000; make bench-sim). The bootstrap nodes keep the swarm
// view (as a bridge showing the whole swarm would); the workers and one
// router node, which routes to one model, do not (--swarm-view=false).
// With MTOR_SIM_SWARM_VIEW=all every node keeps the swarm view: the
// design before per-model topics, the baseline of the same run. It prints,
// per size: how long until the swarm views hold every worker, how long
// the router takes from its first query to its answer and to holding the
// workers of its model (up to the bound), the gossip bytes and announcements received per
// node per second at idle by role, table sizes and connections, how long
// until 10% of workers that died are out and 10% that joined are in, and
// routing decisions (whole queries to demo workers) per second. It
// asserts only that the swarm converged: the figures are measured.
// MTOR_SIM_VIEW_QUEUES=OUT,VALIDATE sizes the views' gossip queues.
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
	limit := simLimit
	if v := os.Getenv("MTOR_SIM_LIMIT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			t.Fatalf("MTOR_SIM_LIMIT: %q is not a duration of at least 1s", v)
		}
		limit = d
	}
	allView := false
	switch v := os.Getenv("MTOR_SIM_SWARM_VIEW"); v {
	case "", "bootstraps":
	case "all":
		allView = true
	default:
		t.Fatalf("MTOR_SIM_SWARM_VIEW: %q is neither bootstraps nor all", v)
	}
	// The share of workers in DHT server mode. A real worker is a server
	// only when AutoNAT finds it publicly reachable (ModeAutoServer): a
	// volunteer behind NAT is a client, which no look-up visits.
	servers := 1.0
	if v := os.Getenv("MTOR_SIM_DHT_SERVERS"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 || f > 1 {
			t.Fatalf("MTOR_SIM_DHT_SERVERS: %q is not a share between 0 and 1", v)
		}
		servers = f
	}
	cfg := simConfig{idle: idle, limit: limit, allView: allView, servers: servers}
	if v := os.Getenv("MTOR_SIM_VIEW_QUEUES"); v != "" {
		a, b, ok := strings.Cut(v, ",")
		out, err1 := strconv.Atoi(a)
		val, err2 := strconv.Atoi(b)
		if !ok || err1 != nil || err2 != nil || out < 0 || val < 0 {
			t.Fatalf("MTOR_SIM_VIEW_QUEUES: %q is not OUT,VALIDATE (queue sizes, 0 for a default)", v)
		}
		cfg.viewOutbound, cfg.viewValidate = out, val
	}
	var rows []string
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < simBootstraps+simModels || n > 5000 {
			t.Fatalf("MTOR_SIM_NODES: %q is not a size between %d and 5000", f, simBootstraps+simModels)
		}
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) { rows = append(rows, runSim(t, n, cfg)) })
	}
	t.Log("\n| nodes | swarm view · DHT servers | views hold all workers after start | router's first query: answered / its model's workers held | gossip B/s (announcements/s) per worker · bootstrap · router | table entries / conns per worker · bootstrap · router | 10% killed: out everywhere | 10% joined: in every view | queries/s (c=8) | heap MB/node | process peak RSS |\n" +
		"|---|---|---|---|---|---|---|---|---|---|---|\n" + strings.Join(rows, "\n"))
}

// simRole is what a simulated node does.
type simRole int

const (
	simBootstrap simRole = iota // join peer, serves no model, keeps the swarm view
	simWorker                   // serves one model
	simRouter                   // serves no model, routes to model-0
)

// simNode is one node of the simulated swarm.
type simNode struct {
	h      host.Host
	disc   *discovery.Discovery
	router *router.Router
	cancel context.CancelFunc
	role   simRole
	view   bool                                // keeps the swarm view
	scores atomic.Pointer[map[peer.ID]float64] // gossipsub peer scores, for explain
}

func (s *simNode) close() {
	s.cancel()
	_ = s.disc.Close()
	_ = s.h.Close()
}

// simConfig is what the MTOR_SIM_* variables set, for every size.
type simConfig struct {
	idle, limit                time.Duration
	allView                    bool    // every node keeps the swarm view
	servers                    float64 // share of workers that are DHT servers
	viewOutbound, viewValidate int     // the views' gossip queues; 0: defaults
}

func runSim(t *testing.T, n int, cfg simConfig) string {
	idle, limit, allView, servers := cfg.idle, cfg.limit, cfg.allView, cfg.servers
	mn := mocknet.New()
	t.Cleanup(func() { _ = mn.Close() })
	qproto := protocol.QueryProtocol(simSwarm)
	var boots []peer.AddrInfo

	// Every host there will be (the nodes, the router, the 10% that
	// join), linked to every other (any node may dial any) before any
	// starts: each dial takes mocknet's one lock, and linking a host
	// that joins a running swarm of 600 took minutes behind the
	// dials.
	hosts := make(chan host.Host, n+1+(n-simBootstraps)/10)
	for range cap(hosts) {
		hosts <- simPeer(t, mn)
	}
	// Each pair once (mocknet's LinkAll links each twice, and each host
	// to itself).
	ids := mn.Peers()
	for i, a := range ids {
		for _, b := range ids[i+1:] {
			if _, err := mn.LinkPeers(a, b); err != nil {
				t.Fatal(err)
			}
		}
	}

	start := func(i int, role simRole) *simNode {
		mh := <-hosts
		// The real node's watermarks and grace period (newHost) at
		// the router, the sim's (simConn*) at the workers. A
		// swarm view holds only the workers it is connected to (a
		// disconnection takes a peer out of the table), so past
		// connHigh workers the real watermarks would trim a bootstrap's
		// view: in the sim they grow with the swarm.
		low, high, grace := simConnLow, simConnHigh, simConnGrace
		switch role {
		case simRouter:
			low, high, grace = connLow, connHigh, time.Minute
		case simBootstrap:
			low, high, grace = max(connLow, 2*n), max(connHigh, 2*n), time.Minute
		}
		cm, err := basicconnmgr.NewConnManager(low, high, basicconnmgr.WithGracePeriod(grace))
		if err != nil {
			t.Fatal(err)
		}
		mh.Network().Notify(cm.Notifee())
		h := &cmHost{Host: mh, cm: cm}
		// As node.New: the join peers' connections are never trimmed.
		for _, b := range boots {
			cm.Protect(b.ID, "mtor-bootstrap")
		}
		ctx, cancel := context.WithCancel(context.Background())
		s := &simNode{h: h, cancel: cancel, role: role, view: allView || role == simBootstrap}
		// As node.New does: a peer joining a topic we publish on gets
		// our announcement at once, not at the next heartbeat.
		var annp atomic.Pointer[announcer]
		// With WithMemberProtocol, as node.New: under mocknet some
		// connected pairs end with no gossip link either way (neither
		// lists the other on any topic), which its repair (rejoin.go)
		// mends; a worker's announcements reach a swarm view only
		// over a direct link.
		d, err := discovery.New(ctx, h, discovery.WithSwarm(simSwarm), discovery.WithBootstrap(boots), discovery.WithMemberProtocol(qproto),
			discovery.WithMDNS(false), discovery.WithDHTMode(simDHTMode(role, i, servers)),
			discovery.WithSwarmView(s.view),
			// As mtor node: a pure worker does not read the catalogue.
			discovery.WithCatalogReader(role != simWorker),
			discovery.WithScoreInspect(func(m map[peer.ID]float64) { s.scores.Store(&m) }, 5*time.Second),
			// Mocknet puts every host in 100::/64, which gossipsub's IP
			// colocation scoring counts as one IP: exempt it.
			discovery.WithIPColocation(discovery.DefaultIPColocationThreshold, mocknetRange),
			discovery.WithGossipQueues(cfg.queues(s.view)),
			discovery.WithOnTopicPeerJoin(func(peer.ID) {
				if a := annp.Load(); a != nil {
					a.refresh()
				}
			}))
		if err != nil {
			t.Fatal(err)
		}
		s.disc = d
		s.router = router.New(h, qproto, tableAdapter{d.Table()}, router.WithProviders(d), router.WithSeeker(d), router.WithMeasurer(d),
			router.WithPeerFinder(d.DHT()))
		if role != simWorker {
			// As node.New: every node serves the query protocol (a
			// worker without models answers UNSUPPORTED), which is
			// how the gossip-link repair tells a swarm member.
			h.SetStreamHandler(qproto, worker.New(nil).HandleStream)
		}
		if role == simWorker {
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
		s := start(i, simBootstrap)
		nodes = append(nodes, s)
		boots = append(boots, peer.AddrInfo{ID: s.h.ID(), Addrs: s.h.Addrs()})
	}
	// Starting is done 8 at a time.
	t0 := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	startWorkers := func(from, count int) {
		for i := from; i < from+count; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				s := start(i, simWorker)
				mu.Lock()
				nodes = append(nodes, s)
				if len(nodes)%100 == 0 {
					// At 1 000 nodes starting takes minutes.
					t.Logf("%d nodes started", len(nodes))
				}
				mu.Unlock()
			}()
		}
		wg.Wait()
	}
	startWorkers(simBootstraps, n-simBootstraps)
	t.Cleanup(func() {
		for _, s := range nodes {
			s.close()
		}
	})
	startedIn := time.Since(t0)
	workers := func() map[peer.ID]bool {
		out := map[peer.ID]bool{}
		for _, s := range nodes {
			if s.role == simWorker {
				out[s.h.ID()] = true
			}
		}
		return out
	}
	views := func() []*simNode {
		return slices.DeleteFunc(slices.Clone(nodes), func(s *simNode) bool { return !s.view })
	}
	explain := func(v *simNode, w peer.ID) string {
		i := slices.IndexFunc(nodes, func(s *simNode) bool { return s.h.ID() == w })
		if i < 0 {
			return "not found"
		}
		ws := nodes[i]
		swarmTopic := protocol.AnnounceTopic(simSwarm)
		_, known := v.disc.Table().Get(w)
		var vs, ws2 float64
		if m := v.scores.Load(); m != nil {
			vs = (*m)[w]
		}
		if m := ws.scores.Load(); m != nil {
			ws2 = (*m)[v.h.ID()]
		}
		return fmt.Sprintf("score of the worker at the node %.1f, of the node at the worker %.1f; the node has %d gossip peers; connected %v; the worker sees it on the swarm topic %v, on the presence topic %v; it sees the worker on the presence topic %v; worker's own entry %v; worker traffic %+v; view's entry %v; view traffic %+v",
			vs, ws2, len(v.disc.PubSub().ListPeers(protocol.PresenceTopic(simSwarm))),
			v.h.Network().Connectedness(w), slices.Contains(ws.disc.PubSub().ListPeers(swarmTopic), v.h.ID()),
			slices.Contains(ws.disc.PubSub().ListPeers(protocol.PresenceTopic(simSwarm)), v.h.ID()),
			slices.Contains(v.disc.PubSub().ListPeers(protocol.PresenceTopic(simSwarm)), w),
			simModel(ws) != "", ws.disc.Traffic(), known, v.disc.Traffic())
	}
	converge := waitSimExplained(t, views(), workers(), nil, limit, explain)
	t.Logf("n=%d: started in %s; every swarm view holds every worker, counted from the last start: %s", n, startedIn.Round(time.Millisecond), converge)

	// The router: a node of its own, routing to model-0. Its first
	// queries find the workers through the DHT; then it follows them.
	rt := start(n, simRouter)
	nodes = append(nodes, rt)
	// As a bridge that has been up a moment: its DHT knows peers.
	for deadline := time.Now().Add(time.Minute); rt.disc.DHT().RoutingTable().Size() < simBootstraps; {
		if time.Now().After(deadline) {
			// Reported through the first query, which then fails.
			t.Logf("the router's DHT routing table holds %d peers after a minute", rt.disc.DHT().RoutingTable().Size())
			break
		}
		time.Sleep(50 * time.Millisecond) // the DHT offers no event for this
	}
	t3 := time.Now()
	qctx, qcancel := context.WithTimeout(context.Background(), time.Minute)
	_, err := rt.router.Query(qctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "model-0", Prompt: "hi"},
		func(*pb.Event) error { return nil })
	qcancel()
	// A failed first query is reported in the row, as a wait past its
	// limit is: the swarm's other figures are still measured.
	routed := "failed"
	qps := "—"
	if err != nil {
		t.Logf("the router's first query: %v", err)
	} else {
		firstAnswer := time.Since(t3)
		model0 := map[peer.ID]bool{}
		for _, s := range nodes {
			if s.role == simWorker && simModel(s) == "model-0" {
				model0[s.h.ID()] = true
			}
		}
		wantHeld := len(model0)
		if !rt.view {
			wantHeld = min(wantHeld, discovery.DefaultMaxPerModel)
		}
		waitHeld(t, rt, model0, wantHeld, 5*time.Minute)
		learnt := time.Since(t3)
		routed = fmt.Sprintf("%s / %s", firstAnswer.Round(10*time.Millisecond), learnt.Round(100*time.Millisecond))
		// Routing decisions over the learnt table.
		qps = fmt.Sprintf("%.0f", simQueries(t, rt.router, 8, 3*time.Second))
	}

	// Idle: announcement traffic, table size, connections, per role.
	tr0 := simTrafficByRole(nodes)
	w0 := time.Now()
	time.Sleep(idle)
	tr1 := simTrafficByRole(nodes)
	secs := time.Since(w0).Seconds()
	var perRole [3]string
	var tables [3]string
	for r := range perRole {
		c := tr1[r].nodes
		if c == 0 {
			continue
		}
		b := float64(tr1[r].BytesIn+tr1[r].BytesOut-tr0[r].BytesIn-tr0[r].BytesOut) / secs / float64(c)
		m := float64(tr1[r].MsgsIn-tr0[r].MsgsIn) / secs / float64(c)
		perRole[r] = fmt.Sprintf("%.0f (%.1f)", b, m)
		tables[r] = fmt.Sprintf("%.0f / %.0f", float64(tr1[r].entries)/float64(c), float64(tr1[r].conns)/float64(c))
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapPerNode := float64(ms.HeapAlloc) / float64(len(nodes)) / (1 << 20)
	if dir := os.Getenv("MTOR_SIM_MEMPROFILE"); dir != "" {
		// The live heap of the converged swarm at idle, for go tool
		// pprof: where a size's memory goes.
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("sim-heap-%d.pprof", n)))
		if err != nil {
			t.Fatal(err)
		}
		err = pprof.Lookup("heap").WriteTo(f, 0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
	}

	// Deaths: 10% of the workers at once.
	var dead []*simNode
	rng := rand.New(rand.NewPCG(uint64(n), 1))
	for _, i := range rng.Perm(len(nodes)) {
		if nodes[i].role == simWorker && len(dead) < (n-simBootstraps)/10 {
			dead = append(dead, nodes[i])
		}
	}
	gone := map[peer.ID]bool{}
	for _, s := range dead {
		gone[s.h.ID()] = true
	}
	nodes = slices.DeleteFunc(nodes, func(s *simNode) bool { return gone[s.h.ID()] })
	for _, s := range dead {
		s.close()
	}
	// Out everywhere: no node holds a dead worker any more.
	deathIn := waitSim(t, nodes, nil, gone, limit)

	// Joins: as many new workers, in every swarm view.
	startWorkers(n+1, len(dead))
	joinIn := waitSimExplained(t, views(), workers(), nil, limit, explain)

	mode := "bootstraps"
	if allView {
		mode = "all"
	}
	mode += fmt.Sprintf(" · %s", simServersLabel(servers))
	if cfg.viewOutbound > 0 || cfg.viewValidate > 0 {
		mode += fmt.Sprintf(" · view queues %d, %d", cfg.viewOutbound, cfg.viewValidate)
	}
	row := fmt.Sprintf("| %d | %s | %s | %s | %s · %s · %s | %s · %s · %s | %s | %s | %s | %.2f | %s |", n, mode, converge,
		routed,
		perRole[simWorker], perRole[simBootstrap], perRole[simRouter],
		tables[simWorker], tables[simBootstrap], tables[simRouter],
		deathIn, joinIn, qps, heapPerNode, peakRSS())
	t.Log(row)
	return row
}

// simPeer adds a host with an Ed25519 key, as a node's identity is
// (LoadOrCreateIdentity): mocknet's GenPeer makes ECDSA ones, whose
// identify and message signatures cost the simulated swarm about 5 % of
// its CPU more than real nodes pay. Its address is GenPeer's: in
// mocknet's 100::/64, ending with the peer ID's last bytes.
func simPeer(t *testing.T, mn mocknet.Mocknet) host.Host {
	t.Helper()
	sk, _, err := crypto.GenerateEd25519Key(cryptorand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		t.Fatal(err)
	}
	ip := slices.Clone(mocknetRange.IP.To16())
	copy(ip[net.IPv6len-min(len(id), 8):], id[max(len(id)-8, 0):])
	a, err := ma.NewMultiaddr(fmt.Sprintf("/ip6/%s/tcp/4242", ip))
	if err != nil {
		t.Fatal(err)
	}
	h, err := mn.AddPeer(sk, a)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// simDHTMode is the Kademlia mode of node i: the bootstraps and the
// router are servers, and workers in the share servers of them, spread
// evenly over the workers' numbers (the 10% that join included).
func simDHTMode(role simRole, i int, servers float64) dht.ModeOpt {
	if role != simWorker || int(float64(i+1)*servers) > int(float64(i)*servers) {
		return dht.ModeServer
	}
	return dht.ModeClient
}

func simServersLabel(servers float64) string {
	if servers == 1 {
		return "all"
	}
	return fmt.Sprintf("%g%%", servers*100)
}

// simModel is the model a worker serves, from its own table entry.
func simModel(s *simNode) string {
	for _, e := range s.disc.Table().Snapshot() {
		if e.Self && len(e.Announce.GetModels()) > 0 {
			return e.Announce.GetModels()[0].GetName()
		}
	}
	return ""
}

// waitHeld waits until s holds want workers of those in of.
func waitHeld(t *testing.T, s *simNode, of map[peer.ID]bool, want int, limit time.Duration) {
	t.Helper()
	start := time.Now()
	for {
		held := 0
		for _, e := range s.disc.Table().Snapshot() {
			if of[e.Peer] {
				held++
			}
		}
		if held >= want {
			return
		}
		if time.Since(start) > limit {
			t.Fatalf("the router holds %d of %d workers of its model after %s", held, want, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// roleTraffic sums the gossip counters, table sizes and connections of
// the nodes of one role.
type roleTraffic struct {
	discovery.Traffic
	nodes, entries, conns int
}

func simTrafficByRole(nodes []*simNode) [3]roleTraffic {
	var out [3]roleTraffic
	for _, s := range nodes {
		tr := s.disc.Traffic()
		r := &out[s.role]
		r.BytesIn += tr.BytesIn
		r.BytesOut += tr.BytesOut
		r.MsgsIn += tr.MsgsIn
		r.nodes++
		r.entries += s.disc.Table().Len()
		r.conns += len(s.h.Network().Peers())
	}
	return out
}

// waitSim waits until every node's table holds every worker in want and
// none in gone, and returns how long that took.
func waitSim(t *testing.T, nodes []*simNode, want, gone map[peer.ID]bool, limit time.Duration) string {
	return waitSimExplained(t, nodes, want, gone, limit, nil)
}

// waitSimExplained is waitSim, which after 30 s logs explain's account of
// one worker missing at one node. Past limit it gives up, and says how far
// the nodes got, so that the other figures are still measured.
func waitSimExplained(t *testing.T, nodes []*simNode, want, gone map[peer.ID]bool, limit time.Duration, explain func(*simNode, peer.ID) string) string {
	t.Helper()
	start := time.Now()
	lastLog := start
	for {
		behind := 0
		var lagging *simNode
		var missing peer.ID
		for _, s := range nodes {
			held := map[peer.ID]bool{}
			stale := false
			for _, e := range s.disc.Table().Snapshot() {
				if want[e.Peer] {
					held[e.Peer] = true
				}
				stale = stale || gone[e.Peer]
			}
			if len(held) < len(want) || stale {
				behind++
				for p := range want {
					if !held[p] {
						lagging, missing = s, p
						break
					}
				}
			}
		}
		if behind == 0 {
			return time.Since(start).Round(100 * time.Millisecond).String()
		}
		if time.Since(start) > limit {
			t.Logf("%d of %d nodes still behind after %s; going on", behind, len(nodes), limit)
			return fmt.Sprintf("not in %s (%d of %d behind)", limit, behind, len(nodes))
		}
		if time.Since(lastLog) > 10*time.Second {
			lastLog = time.Now()
			var held, pending []int
			for _, s := range nodes {
				held = append(held, s.disc.Table().Len())
				pending = append(pending, s.disc.Table().Quarantined())
			}
			t.Logf("%s: %d of %d nodes behind; table sizes %v; quarantined %v", time.Since(start).Round(time.Second), behind, len(nodes), summary(held), summary(pending))
			if explain != nil && lagging != nil && time.Since(start) > 30*time.Second {
				// explain asks pubsub's event loop, which in a swarm
				// starved of CPU answers after minutes: the wait goes
				// on without it.
				done := make(chan string, 1)
				go func() { done <- explain(lagging, missing) }()
				select {
				case why := <-done:
					t.Logf("node %s lacks worker %s: %s", lagging.h.ID(), missing, why)
				case <-time.After(5 * time.Second):
					t.Logf("node %s lacks worker %s: pubsub did not answer in 5 s", lagging.h.ID(), missing)
				}
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
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

// peakRSS is the process's peak resident set so far (Linux's VmHWM):
// with several sizes in one run, that of the largest so far.
func peakRSS() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "VmHWM:" {
			if kb, err := strconv.Atoi(f[1]); err == nil {
				return fmt.Sprintf("%.1f GB", float64(kb)/(1<<20))
			}
		}
	}
	return "?"
}

// summary is min, median and max of xs.
func summary(xs []int) string {
	s := slices.Clone(xs)
	slices.Sort(s)
	return fmt.Sprintf("min %d p50 %d max %d", s[0], s[len(s)/2], s[len(s)-1])
}

// TestSimDHTModeShare: MTOR_SIM_DHT_SERVERS's share of the workers are
// DHT servers, spread over them; bootstraps and the router always are.
func TestSimDHTModeShare(t *testing.T) {
	for _, tc := range []struct {
		share float64
		want  int // servers among 1 000 workers
	}{{0, 0}, {0.1, 100}, {0.25, 250}, {1, 1000}} {
		got, run, longest := 0, 0, 0
		for i := simBootstraps; i < simBootstraps+1000; i++ {
			if simDHTMode(simWorker, i, tc.share) == dht.ModeServer {
				got++
				run = 0
			} else if run++; run > longest {
				longest = run
			}
		}
		if got != tc.want {
			t.Errorf("share %g: %d servers of 1000 workers, want %d", tc.share, got, tc.want)
		}
		if tc.share > 0 && float64(longest) > 1/tc.share {
			t.Errorf("share %g: %d clients in a row, not spread", tc.share, longest)
		}
		for _, r := range []simRole{simBootstrap, simRouter} {
			if simDHTMode(r, 0, tc.share) != dht.ModeServer {
				t.Errorf("share %g: role %d is not a DHT server", tc.share, r)
			}
		}
	}
}

// queues are the gossip queues of a node: the views' as set, the
// others' the defaults.
func (c simConfig) queues(view bool) (outbound, validate int) {
	if !view {
		return 0, 0
	}
	return c.viewOutbound, c.viewValidate
}
