package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestBenchSwarm measures swarms of real `mtor node` processes on loopback
// (a bootstrap node, which keeps the swarm view, and demo workers, which
// run with --swarm-view=false): how long a new worker takes from its start
// to being routable at every node with the swarm view, how long a
// SIGKILLed one stays in rotation there, and the idle gossip, RSS and CPU
// of the workers and of the bootstrap. MTOR_BENCH_SWARM_VIEW=all gives
// every node the swarm view (the design before per-model topics);
// MTOR_BENCH_SWARM_TRANSPORT=tcp or quic runs the nodes on one transport
// (both otherwise, as `mtor node` listens by default). It
// prints a table and asserts only that the views converged: the figures
// are measured, never thresholds. Off unless MTOR_BENCH_SWARM names the
// sizes, e.g. MTOR_BENCH_SWARM=10,25,50 (make bench-swarm).
func TestBenchSwarm(t *testing.T) {
	spec := os.Getenv("MTOR_BENCH_SWARM")
	if spec == "" {
		t.Skip("set MTOR_BENCH_SWARM=10,25,50 (make bench-swarm) to run the swarm benchmark")
	}
	needBinary(t)
	// The nodes run an installed copy; e2eBin is this package's, and
	// this benchmark never runs in parallel.
	defer func(built string) { e2eBin = built }(e2eBin)
	e2eBin = installedCopy(t, e2eBin, t.TempDir())
	var sizes []int
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 3 || n > 500 {
			t.Fatalf("MTOR_BENCH_SWARM: %q is not a size between 3 and 500", f)
		}
		sizes = append(sizes, n)
	}
	// A minute idle: past the idle memory trim's first two looks
	// (cmd/mtor/memtrim.go), so RSS is what an idle node holds, not its
	// start-up peak.
	idle := envIdle(t, "MTOR_BENCH_SWARM_IDLE", time.Minute)
	allView := false
	switch v := os.Getenv("MTOR_BENCH_SWARM_VIEW"); v {
	case "", "bootstrap":
	case "all":
		allView = true
	default:
		t.Fatalf("MTOR_BENCH_SWARM_VIEW: %q is neither bootstrap nor all", v)
	}
	tr, listen, err := swarmListen(os.Getenv("MTOR_BENCH_SWARM_TRANSPORT"))
	if err != nil {
		t.Fatalf("MTOR_BENCH_SWARM_TRANSPORT: %v", err)
	}
	var rows []swarmRow
	for _, n := range sizes {
		t.Run(fmt.Sprintf("n=%d", n), func(t *testing.T) { rows = append(rows, measureSwarm(t, n, idle, allView, listen)) })
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n| processes | transport | swarm view | start→routable at every view, p50 / max | SIGKILL→out at every view, p50 / max | gossip B/s in+out per worker · bootstrap | idle RSS MB per worker p50 / max · bootstrap | worker RssAnon · RssFile p50, MB | worker peers · connections p50 | idle CPU %% per worker p50 / max · bootstrap |\n")
	fmt.Fprintf(&b, "|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %d | %s | %s | %s / %s | %s / %s | %.0f · %.0f | %.1f / %.1f · %.1f | %.1f · %.1f | %d · %d | %.2f / %.2f · %.2f |\n", r.n, tr, r.view,
			wholeMs(r.joinP50), wholeMs(r.joinMax), wholeMs(r.deathP50), wholeMs(r.deathMax), r.gossipBps, r.bootGossipBps,
			r.rssP50, r.rssMax, r.bootRSS, r.anonP50, r.fileP50, r.peersP50, r.connsP50, r.cpuP50, r.cpuMax, r.bootCPU)
	}
	t.Log(b.String())
}

type swarmRow struct {
	n                                    int
	view                                 string // who keeps the swarm view
	joinP50, joinMax, deathP50, deathMax time.Duration
	gossipBps                            float64 // per worker, bytes in + out per second
	rssP50, rssMax                       float64 // MB, of the workers
	anonP50, fileP50                     float64 // MB, the workers' RssAnon and RssFile
	peersP50, connsP50                   int     // the workers' connected peers and connections at the idle window's end
	cpuP50, cpuMax                       float64 // % of one core, of the workers
	bootGossipBps, bootRSS, bootCPU      float64 // the bootstrap's
}

// measureSwarm starts a bootstrap and n-1 demo workers, lets them idle, then
// starts one more worker and kills it.
func measureSwarm(t *testing.T, n int, idle time.Duration, allView bool, listen []string) swarmRow {
	dir := t.TempDir()
	var listenArgs []string
	for _, l := range listen {
		listenArgs = append(listenArgs, "--listen", l)
	}
	// The default heartbeat, as a real swarm runs.
	boot := startNode(t, "boot", append([]string{"--data-dir", filepath.Join(dir, "boot"),
		"--api", "127.0.0.1:0", "--no-mdns", "--no-detect"}, listenArgs...)...)
	join := boot.value("join")
	worker := func(i int) []string {
		return append([]string{"--data-dir", filepath.Join(dir, fmt.Sprintf("w%d", i)),
			"--api", "127.0.0.1:0", "--no-mdns", "--backend", "demo", "--join", join, "--swarm-view=" + strconv.FormatBool(allView)}, listenArgs...)
	}
	procs := []*proc{boot}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4) // starting a node is CPU-bound; four at a time
	for i := 1; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			p := startNode(t, fmt.Sprintf("w%d", i), worker(i)...)
			mu.Lock()
			procs = append(procs, p)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	clients := make([]*api.Client, len(procs))
	for i, p := range procs {
		clients[i] = api.NewClient(p.value("api"))
	}
	// The nodes with the swarm view: they list every worker.
	views := clients[:1]
	if allView {
		views = clients
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		counts := workerCounts(t, views)
		if slices.Min(counts) == n-1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("swarm of %d did not converge in 5 min: workers seen per node %v", n, counts)
		}
		time.Sleep(500 * time.Millisecond)
	}

	// Idle: gossip, CPU and RSS over the window, nothing else asked of
	// the nodes (no polling).
	g0, c0 := gossipBytes(t, clients), cpuTicks(t, procs)
	start := time.Now()
	time.Sleep(idle)
	g1, c1 := gossipBytes(t, clients), cpuTicks(t, procs)
	peers, conns := connectedPeers(t, clients[1:])
	window := time.Since(start).Seconds()
	var rowGossip float64
	cpu := make([]float64, len(procs))
	rss := make([]float64, len(procs))
	var anon, file []float64 // the workers' RssAnon and RssFile
	for i, p := range procs {
		cpu[i] = 100 * float64(c1[i]-c0[i]) / clockTicks / window
		rss[i] = statusMB(t, p.cmd.Process.Pid, "VmRSS")
		if i > 0 {
			anon = append(anon, statusMB(t, p.cmd.Process.Pid, "RssAnon"))
			file = append(file, statusMB(t, p.cmd.Process.Pid, "RssFile"))
		}
		if i > 0 {
			rowGossip += float64(g1[i]-g0[i]) / window
		}
	}
	rowGossip /= float64(len(procs) - 1)
	r := swarmRow{n: n, view: "bootstrap", gossipBps: rowGossip,
		bootGossipBps: float64(g1[0]-g0[0]) / window, bootRSS: rss[0], bootCPU: cpu[0]}
	if allView {
		r.view = "all"
	}
	cpu, rss = cpu[1:], rss[1:] // the workers'

	// A new worker: from its exec to listed by every node.
	t0 := time.Now()
	nw := startNode(t, "new", worker(n)...)
	newID := nw.value("peer")
	joinTimes := waitAll(t, views, t0, func(peers []api.Peer) bool { return hasPeer(peers, newID) })
	// Its death: from SIGKILL to out of every node's peers.
	t1 := time.Now()
	if err := nw.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deathTimes := waitAll(t, views, t1, func(peers []api.Peer) bool { return !hasPeer(peers, newID) })

	r.joinP50, r.joinMax = p50max(joinTimes)
	r.deathP50, r.deathMax = p50max(deathTimes)
	r.cpuP50, r.cpuMax = p50max(cpu)
	r.rssP50, r.rssMax = p50max(rss)
	r.anonP50, _ = p50max(anon)
	r.fileP50, _ = p50max(file)
	r.peersP50, _ = p50max(peers)
	r.connsP50, _ = p50max(conns)
	t.Logf("n=%d (swarm view: %s): join p50 %s max %s; death p50 %s max %s; gossip %.0f B/worker/s, %.0f at the bootstrap; worker RSS p50 %.1f MB max %.1f (RssAnon %.1f, RssFile %.1f), bootstrap %.1f; worker peers p50 %d, connections p50 %d; worker CPU p50 %.2f%% max %.2f%%, bootstrap %.2f%%",
		n, r.view, r.joinP50, r.joinMax, r.deathP50, r.deathMax, r.gossipBps, r.bootGossipBps, r.rssP50, r.rssMax, r.anonP50, r.fileP50, r.bootRSS, r.peersP50, r.connsP50, r.cpuP50, r.cpuMax, r.bootCPU)
	return r
}

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat:
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// waitAll polls every node until cond holds for its peers, and returns how
// long after t0 each first saw it.
func waitAll(t *testing.T, clients []*api.Client, t0 time.Time, cond func([]api.Peer) bool) []time.Duration {
	t.Helper()
	out := make([]time.Duration, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
			defer cancel()
			for ctx.Err() == nil {
				pctx, pcancel := context.WithTimeout(ctx, 10*time.Second)
				peers, err := c.Peers(pctx)
				pcancel()
				if err == nil && cond(peers) {
					out[i] = time.Since(t0)
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			t.Errorf("node %d: condition not met within 3 min", i)
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return out
}

func hasPeer(peers []api.Peer, id string) bool {
	return slices.ContainsFunc(peers, func(p api.Peer) bool { return p.Peer == id && len(p.Models) > 0 })
}

// p50max is the median (the upper one of an even count) and the largest.
func p50max[T cmp.Ordered](v []T) (T, T) {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2], s[len(s)-1]
}

// workerCounts is how many other workers serving a model each node lists.
func workerCounts(t *testing.T, clients []*api.Client) []int {
	t.Helper()
	out := make([]int, len(clients))
	for i, c := range clients {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		peers, err := c.Peers(ctx)
		cancel()
		if err != nil {
			continue
		}
		for _, p := range peers {
			if !p.Self && len(p.Models) > 0 {
				out[i]++
			}
		}
		// A worker counts itself too: the bootstrap has no row of its own.
		if slices.ContainsFunc(peers, func(p api.Peer) bool { return p.Self && len(p.Models) > 0 }) {
			out[i]++
		}
	}
	return out
}

// readIDs reads each node's /v1/id, with its gossip figures.
func readIDs(t *testing.T, clients []*api.Client) []*api.IDInfo {
	t.Helper()
	out := make([]*api.IDInfo, len(clients))
	for i, c := range clients {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		id, err := c.ID(ctx)
		cancel()
		if err != nil || id.Gossip == nil {
			t.Fatalf("node %d: /v1/id without gossip figures: %v", i, err)
		}
		out[i] = id
	}
	return out
}

// gossipBytes is each node's gossip bytes, in and out.
func gossipBytes(t *testing.T, clients []*api.Client) []uint64 {
	t.Helper()
	var out []uint64
	for _, id := range readIDs(t, clients) {
		out = append(out, id.Gossip.BytesIn+id.Gossip.BytesOut)
	}
	return out
}

// connectedPeers is each node's connected peers and libp2p connections.
func connectedPeers(t *testing.T, clients []*api.Client) (peers, conns []int) {
	t.Helper()
	for _, id := range readIDs(t, clients) {
		peers = append(peers, id.ConnectedPeers)
		conns = append(conns, id.Connections)
	}
	return peers, conns
}

// cpuTicks reads utime+stime of each process from /proc/PID/stat.
func cpuTicks(t *testing.T, procs []*proc) []uint64 {
	t.Helper()
	out := make([]uint64, len(procs))
	for i, p := range procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		// Fields after the command name, which is in parentheses and
		// may hold spaces: state is field 3, utime 14, stime 15.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			t.Fatalf("/proc/%d/stat: %d fields", p.cmd.Process.Pid, len(f))
		}
		u, err1 := strconv.ParseUint(f[11], 10, 64)
		s, err2 := strconv.ParseUint(f[12], 10, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("/proc/%d/stat: utime %q stime %q", p.cmd.Process.Pid, f[11], f[12])
		}
		out[i] = u + s
	}
	return out
}

// statusMB is a field of /proc/PID/status in kB (VmRSS, RssAnon,
// RssFile), in MB.
func statusMB(t *testing.T, pid int, field string) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				t.Fatalf("%s %q: %v", field, v, err)
			}
			return kb / 1024
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, field)
	return 0
}

// installedCopy copies the binary into dir with ordinary writes, as an
// installer or a download does, and drops the copy's pages from the page
// cache, so the nodes fault them in from disk as after a reboot. The
// binary the linker wrote is a poor stand-in for RSS: the linker writes
// through a memory map, and on kernels with large page-cache folios
// (6.18 here) every page of such a file a process maps is resident at
// once: 31 MB of RssFile for a lone worker against 24 MB for a copy.
func installedCopy(t *testing.T, src, dir string) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	dst := filepath.Join(dir, "mtor")
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	// Not io.Copy: between two files it may share extents or splice
	// pages rather than write them.
	if _, err := io.CopyBuffer(struct{ io.Writer }{out}, struct{ io.Reader }{in}, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := out.Sync(); err != nil {
		t.Fatal(err)
	}
	// Clean pages only leave the cache: hence the Sync above.
	if err := unix.Fadvise(int(out.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	return dst
}

// swarmListen is the swarm bench's transport and its nodes' listen
// addresses: both by default, as a node started on the defaults listens
// (and dials QUIC first); tcp or quic alone on request.
func swarmListen(tr string) (string, []string, error) {
	const tcp, quic = "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"
	switch tr {
	case "tcp":
		return tr, []string{tcp}, nil
	case "quic":
		return tr, []string{quic}, nil
	case "", "both":
		return "both", []string{tcp, quic}, nil
	}
	return "", nil, fmt.Errorf("%q is not tcp, quic or both", tr)
}

// envIdle is the idle window the variable name sets, at least 1s; def
// where it is unset.
func envIdle(t *testing.T, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < time.Second {
		t.Fatalf("%s: %q is not a duration of at least 1s", name, v)
	}
	return d
}

// wholeMs is d in whole milliseconds, for the swarm table.
func wholeMs(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }

// TestSwarmListen: the swarm bench runs its nodes on both transports
// unless told one, and refuses a name it does not know.
func TestSwarmListen(t *testing.T) {
	const tcp, quic = "/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"
	cases := []struct {
		in, name string
		listen   []string
		bad      bool
	}{
		{"", "both", []string{tcp, quic}, false},
		{"both", "both", []string{tcp, quic}, false},
		{"tcp", "tcp", []string{tcp}, false},
		{"quic", "quic", []string{quic}, false},
		{"udp", "", nil, true},
	}
	for _, tc := range cases {
		name, listen, err := swarmListen(tc.in)
		if (err != nil) != tc.bad || name != tc.name || !slices.Equal(listen, tc.listen) {
			t.Errorf("swarmListen(%q) = %q, %v, %v; want %q, %v, error %v", tc.in, name, listen, err, tc.name, tc.listen, tc.bad)
		}
	}
}
