package main

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestBenchSwarmNAT measures what an idle worker behind NAT costs in a
// swarm of real `mtor node` processes, next to a public one: a public
// segment (a bootstrap node, two relays and public demo workers, each in
// a network namespace of its own at an address of its own) and a home
// LAN behind a port-restricted NAT (10.1.0.0/24, the NAT'd demo workers,
// in one namespace), joined only to each other as in the NAT suite. On loopback every worker is public,
// so `make bench-swarm` cannot show the other kind: here AutoNAT finds
// the NAT'd ones private, their DHT turns client, and they reach the
// swarm through relays.
//
// MTOR_BENCH_SWARM_NAT=N,K (make bench-swarm-nat) runs N processes, K of
// them workers behind the NAT; MTOR_BENCH_SWARM_NAT_IDLE is the idle
// window after every NAT'd worker has its verdict (60s). It prints a table
// and asserts only that the swarm converged: the figures are measured,
// never thresholds.
func TestBenchSwarmNAT(t *testing.T) {
	spec := os.Getenv("MTOR_BENCH_SWARM_NAT")
	if spec == "" {
		t.Skip("set MTOR_BENCH_SWARM_NAT=50,10 (make bench-swarm-nat) to run it")
	}
	total, nated, err := parseNATSwarm(spec)
	if err != nil {
		t.Fatalf("MTOR_BENCH_SWARM_NAT: %v", err)
	}
	idle := envIdle(t, "MTOR_BENCH_SWARM_NAT_IDLE", time.Minute)
	needNAT(t)
	defer func(built string) { e2eBin = built }(e2eBin)
	e2eBin = installedCopy(t, e2eBin, t.TempDir())

	// Each public node is a host of its own (a namespace, an address),
	// as volunteers are: sharing one, they would be one operator's to
	// gossipsub's IP colocation penalty, and their TCP dials would all
	// leave from one address.
	public := total - 3 - nated
	ips := map[string]string{"nat": "11.250.0.1", "lan": "10.1.0.2"}
	pubRole := func(i int) string { return fmt.Sprintf("p%d", i) }
	for i := range 3 + public {
		ips[pubRole(i)] = fmt.Sprintf("11.%d.%d.1", i/250, i%250)
	}
	n := newNetns(t, ips)
	for i := range 3 + public {
		n.public(pubRole(i))
	}
	n.public("nat")
	n.lan("nat", "lan", "10.1.0")
	n.nat("nat", "lan", natRestricted)

	dir := t.TempDir()
	node := func(role, name string, args ...string) *proc {
		base := []string{"--data-dir", filepath.Join(dir, name), "--no-mdns", "--api", natAPI,
			"--listen", "/ip4/0.0.0.0/tcp/" + natListenPort, "--listen", "/ip4/0.0.0.0/udp/" + natListenPort + "/quic-v1"}
		if role == "lan" { // all NAT'd workers share one namespace
			base = []string{"--data-dir", filepath.Join(dir, name), "--no-mdns", "--api", "127.0.0.1:0",
				"--listen", "/ip4/0.0.0.0/tcp/0", "--listen", "/ip4/0.0.0.0/udp/0/quic-v1"}
		}
		return startNodeIn(t, name, n.prefix(role), append(base, args...)...)
	}
	boot := node(pubRole(0), "boot", "--no-detect", "--reachability", "public")
	join := "/ip4/" + ips[pubRole(0)] + "/tcp/" + natListenPort + "/p2p/" + boot.value("peer")
	for i := 1; i <= 2; i++ {
		node(pubRole(i), fmt.Sprintf("r%d", i), "--no-detect", "--relay", "--join", join)
	}
	type worker struct {
		p     *proc
		role  string // its namespace: its own, or lan
		nated bool   // in lan, behind the NAT
	}
	var (
		mu      sync.Mutex
		workers []worker
		wg      sync.WaitGroup
	)
	sem := make(chan struct{}, 4) // starting a node is CPU-bound
	for i := range public + nated {
		role := "lan"
		if i < public {
			role = pubRole(3 + i)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			p := node(role, fmt.Sprintf("w%d", i), "--backend", "demo", "--join", join, "--swarm-view=false")
			mu.Lock()
			workers = append(workers, worker{p, role, i >= public})
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	// Converged: the bootstrap's view lists every worker.
	deadline := time.Now().Add(5 * time.Minute)
	for {
		var peers []api.Peer
		err := n.getAt(pubRole(0), boot.value("api"), "/v1/peers", &peers)
		if err != nil && time.Now().After(deadline) {
			t.Fatalf("the bootstrap's peers: %v", err)
		}
		if err == nil {
			seen := 0
			for _, p := range peers {
				if !p.Self && len(p.Models) > 0 {
					seen++
				}
			}
			if seen == len(workers) {
				break
			}
			if time.Now().After(deadline) {
				var bid api.IDInfo
				_ = n.getAt(pubRole(0), boot.value("api"), "/v1/id", &bid)
				t.Fatalf("the bootstrap lists %d of %d workers after 5 min (%d rows, %d connections); its log:\n%s", seen, len(workers), len(peers), bid.ConnectedPeers, boot.outputTail(8<<10))
			}
		}
		time.Sleep(time.Second)
	}
	// Every NAT'd worker has AutoNAT's verdict, or 5 min have passed.
	id := func(w worker) api.IDInfo {
		var v api.IDInfo
		if err := n.getAt(w.role, w.p.value("api"), "/v1/id", &v); err != nil {
			t.Fatalf("worker %s: %v", w.p.name, err)
		}
		return v
	}
	verdictBy := time.Now().Add(5 * time.Minute)
	for {
		undecided := 0
		for _, w := range workers {
			if w.nated && id(w).ReachabilityHow != "autonat" {
				undecided++
			}
		}
		if undecided == 0 || time.Now().After(verdictBy) {
			break
		}
		time.Sleep(2 * time.Second)
	}

	var procs []*proc
	for _, w := range workers {
		procs = append(procs, w.p)
	}
	c0 := cpuTicks(t, procs)
	start := time.Now()
	time.Sleep(idle)
	c1 := cpuTicks(t, procs)
	window := time.Since(start).Seconds()
	rows := []*natSwarmRow{{kind: "public worker"}, {kind: "worker behind NAT"}}
	for i, w := range workers {
		pid := w.p.cmd.Process.Pid
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "mtor" {
			t.Fatalf("pid %d is %q, not the node", pid, comm)
		}
		v := id(w)
		r := rows[0]
		if w.nated {
			r = rows[1]
		}
		r.rss = append(r.rss, statusMB(t, pid, "VmRSS"))
		r.anon = append(r.anon, statusMB(t, pid, "RssAnon"))
		r.file = append(r.file, statusMB(t, pid, "RssFile"))
		r.peers = append(r.peers, v.ConnectedPeers)
		r.conns = append(r.conns, v.Connections)
		r.cpu = append(r.cpu, 100*float64(c1[i]-c0[i])/clockTicks/window)
		r.verdicts = append(r.verdicts, v.ReachabilityStatus+" ("+v.ReachabilityHow+")")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n%d processes (a bootstrap, 2 relays, %d public workers, %d behind a port-restricted NAT), %s idle:\n", total, public, nated, idle)
	fmt.Fprintf(&b, "| worker | idle RSS p50 / max, MB | RssAnon · RssFile p50, MB | connected peers p50 / max | connections p50 / max | idle CPU p50 / max, %% of a core | reachability |\n|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		rss, rssMax := p50max(r.rss)
		anon, _ := p50max(r.anon)
		file, _ := p50max(r.file)
		peers, peersMax := p50max(r.peers)
		conns, connsMax := p50max(r.conns)
		cpu, cpuMax := p50max(r.cpu)
		fmt.Fprintf(&b, "| %s (%d) | %.1f / %.1f | %.1f · %.1f | %d / %d | %d / %d | %.2f / %.2f | %s |\n", r.kind, len(r.rss),
			rss, rssMax, anon, file, peers, peersMax, conns, connsMax, cpu, cpuMax, tally(r.verdicts))
	}
	t.Log(b.String())
}

type natSwarmRow struct {
	kind                 string
	rss, anon, file, cpu []float64
	peers, conns         []int
	verdicts             []string
}

// parseNATSwarm reads "N,K": N processes, K workers behind the NAT.
func parseNATSwarm(spec string) (total, nated int, err error) {
	a, b, ok := strings.Cut(spec, ",")
	if total, err = strconv.Atoi(strings.TrimSpace(a)); !ok || err != nil {
		return 0, 0, fmt.Errorf("%q is not N,K", spec)
	}
	if nated, err = strconv.Atoi(strings.TrimSpace(b)); err != nil {
		return 0, 0, fmt.Errorf("%q is not N,K", spec)
	}
	// A bootstrap, two relays and at least one public worker.
	if nated < 1 || total-3-nated < 1 || total > 200 {
		return 0, 0, fmt.Errorf("%q: want 1 ≤ K ≤ N-4, N ≤ 200", spec)
	}
	return total, nated, nil
}

// tally counts equal strings: "private (autonat) ×9, unknown () ×1".
func tally(v []string) string {
	counts := map[string]int{}
	for _, s := range v {
		counts[s]++
	}
	var out []string
	for _, s := range slices.Sorted(maps.Keys(counts)) {
		out = append(out, fmt.Sprintf("%s ×%d", s, counts[s]))
	}
	return strings.Join(out, ", ")
}

func TestParseNATSwarm(t *testing.T) {
	for _, tc := range []struct {
		spec         string
		total, nated int
		ok           bool
	}{
		{"50,10", 50, 10, true},
		{" 5 , 1", 5, 1, true},
		{"50", 0, 0, false},
		{"4,1", 0, 0, false},    // no public worker left
		{"50,0", 0, 0, false},   // nobody behind the NAT
		{"201,10", 0, 0, false}, // too many
		{"a,b", 0, 0, false},
	} {
		total, nated, err := parseNATSwarm(tc.spec)
		if (err == nil) != tc.ok || total != tc.total || nated != tc.nated {
			t.Errorf("parseNATSwarm(%q) = %d, %d, %v; want %d, %d, ok %v", tc.spec, total, nated, err, tc.total, tc.nated, tc.ok)
		}
	}
}
