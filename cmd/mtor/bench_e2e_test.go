package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestE2EBenchComparesPaths runs `mtor bench` small: every path (direct,
// the Go proxy, nginx where installed, bridge → worker on TCP and on
// QUIC, one node) answers
// whole streamed answers at each level and in the slow-stream rows, and
// the CPU of each measured process is counted, the bench's own (load
// generator and backend) on every row; --node-env reaches the node
// processes and nothing else.
func TestE2EBenchComparesPaths(t *testing.T) {
	needBinary(t)
	prof := filepath.Join(t.TempDir(), "cpu")
	// Answers of 5 and of 9 tokens, not the default 16: every path must
	// carry the count asked for (the load generator refuses any other);
	// the slow streams take the first, and their rows a third of the time.
	const short, long = 5, 9
	code, stdout, stderr := mtor(t, "bench", "--queries", "40", "--concurrency", "1,4", "--streams", "4", "--json",
		"--tokens", strconv.Itoa(short)+","+strconv.Itoa(long), "--node-env", "MTOR_CPUPROFILE="+prof)
	if code != 0 {
		t.Fatalf("mtor bench: exit %d: %s", code, stderr)
	}
	var rep benchReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, stdout)
	}
	seen := map[string]int{}
	for i, r := range append(rep.Rows, rep.Streams...) {
		seen[r.Path]++
		if r.Errors != 0 || r.P50 <= 0 {
			t.Errorf("%s at %d: %d errors (%s), p50 %s", r.Path, r.Concurrency, r.Errors, r.FirstError, r.P50)
		}
		// The rows of the first length come first, then the second's;
		// the slow streams at the first.
		want := short
		if i >= len(rep.Rows)/2 && i < len(rep.Rows) {
			want = long
		}
		if r.Tokens != want {
			t.Errorf("%s at %d: answers of %d tokens, want %d", r.Path, r.Concurrency, r.Tokens, want)
		}
	}
	// Every path's bench process, at least, has a split at each level.
	if len(rep.Splits) < 2*5 {
		t.Errorf("bench --json with two lengths: %d splits: %+v", len(rep.Splits), rep.Splits)
	}
	paths := []string{"direct", "go-proxy", "mtor", "mtor-quic", "mtor1"}
	if pathbench.NginxPath() != "" {
		paths = append(paths, "nginx")
	}
	// Against nginx: exactly what its rows give (rows this small may
	// leave nginx under a clock tick of CPU, and then a level out), and
	// nothing without nginx.
	if want := vsNginx(rep.Rows, rep.Streams); !slices.Equal(rep.VsNginx, want) {
		t.Errorf("vs_nginx %+v, want %+v", rep.VsNginx, want)
	}
	if pathbench.NginxPath() == "" && len(rep.VsNginx) > 0 {
		t.Errorf("vs_nginx without nginx: %+v", rep.VsNginx)
	}
	for _, r := range rep.VsNginx {
		if r.Process == "bench" || r.Process == "nginx" || r.Path == "nginx" || r.Ratio <= 0 {
			t.Errorf("vs_nginx entry %+v", r)
		}
	}
	for _, p := range paths {
		if seen[p] != 6 {
			t.Errorf("path %s: %d rows, want 2 levels × 2 lengths + 2 stream rows", p, seen[p])
		}
	}
	var benchCPU time.Duration
	for _, r := range rep.Rows {
		roles := map[string][]string{"direct": {"bench"}, "go-proxy": {"bench", "proxy"}, "nginx": {"bench", "nginx"},
			"mtor": {"bench", "bridge", "worker"}, "mtor-quic": {"bench", "bridge", "worker"}, "mtor1": {"bench", "node"}}[r.Path]
		for _, role := range roles {
			if _, ok := r.CPU[role]; !ok {
				t.Errorf("%s at %d: no CPU time for %s", r.Path, r.Concurrency, role)
			}
		}
		if len(r.CPU) != len(roles) {
			t.Errorf("%s at %d: CPU of %v, want %v", r.Path, r.Concurrency, r.CPU, roles)
		}
		benchCPU += r.CPU["bench"]
	}
	// A row this small can take less than one clock tick of CPU (10 ms)
	// in a process; all of them together cannot.
	if benchCPU <= 0 {
		t.Errorf("the bench's own CPU over %d rows: %s", len(rep.Rows), benchCPU)
	}
	// MTOR_CPUPROFILE=PREFIX makes each node write PREFIX.PID when it
	// stops: the two pairs' four nodes and the one node, not the proxy
	// (which would ignore it) nor the bench itself (which never saw it).
	files, err := filepath.Glob(prof + ".*")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 5 {
		t.Errorf("--node-env MTOR_CPUPROFILE: %d profiles %v, want one of each of the 5 nodes", len(files), files)
	}
	for _, f := range files {
		if st, err := os.Stat(f); err != nil || st.Size() == 0 {
			t.Errorf("profile %s: empty or unreadable (%v)", f, err)
		}
	}
	t.Logf("bench rows: %d, stream rows: %d", len(rep.Rows), len(rep.Streams))
}

// TestEnvName checks the names `mtor bench --node-env` takes.
func TestEnvName(t *testing.T) {
	cases := map[string]bool{
		"GOMAXPROCS": true, "GOGC": true, "_x": true, "MTOR_CPUPROFILE": true, "a1": true, "x": true,
		"": false, "1A": false, "GO MAXPROCS": false, "GO-GC": false, "É": false, "A=": false,
	}
	for k, want := range cases {
		if got := envName(k); got != want {
			t.Errorf("envName(%q) = %v, want %v", k, got, want)
		}
	}
}

// TestPrintBenchSplits: with answers of two lengths the table gets a
// TOKENS column, and each path's processes their CPU per answer and per
// token, fitted over the lengths.
func TestPrintBenchSplits(t *testing.T) {
	row := func(path string, tokens int, cpu map[string]time.Duration) pathbench.Result {
		return pathbench.Result{Path: path, Concurrency: 4, Queries: 100, Tokens: tokens, Elapsed: time.Second,
			P50: time.Millisecond, P99: 2 * time.Millisecond, CPU: cpu}
	}
	// bridge: 100 µs per answer and 2 µs per token; bench: 50 µs and 1 µs.
	per := func(a, b time.Duration, tokens int) time.Duration { return 100 * (a + b*time.Duration(tokens)) }
	rep := &benchReport{Rows: []pathbench.Result{
		row("direct", 16, map[string]time.Duration{"bench": per(50*time.Microsecond, time.Microsecond, 16)}),
		row("mtor", 16, map[string]time.Duration{"bench": per(50*time.Microsecond, time.Microsecond, 16), "bridge": per(100*time.Microsecond, 2*time.Microsecond, 16)}),
		row("direct", 256, map[string]time.Duration{"bench": per(50*time.Microsecond, time.Microsecond, 256)}),
		row("mtor", 256, map[string]time.Duration{"bench": per(50*time.Microsecond, time.Microsecond, 256), "bridge": per(100*time.Microsecond, 2*time.Microsecond, 256)}),
	}}
	rep.Splits = splitRows(rep.Rows)
	if len(rep.Splits) != 3 {
		t.Fatalf("splits %+v, want direct's bench, mtor's bench and bridge", rep.Splits)
	}
	var out bytes.Buffer
	if err := printBench(&out, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"TOKENS",
		"CPU PER ANSWER + PER TOKEN (answers of 16, 256 tokens)",
		"bench 50 µs +1.00 µs/token, bridge 100 µs +2.00 µs/token",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no %q in\n%s", want, out.String())
		}
	}
	// One length: no TOKENS column, no split.
	out.Reset()
	one := &benchReport{Rows: rep.Rows[:2]}
	if one.Splits = splitRows(one.Rows); len(one.Splits) != 0 {
		t.Errorf("one length: splits %+v", one.Splits)
	}
	if err := printBench(&out, one); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); strings.Contains(s, "TOKENS") || strings.Contains(s, "PER ANSWER") || !strings.Contains(s, "CPU PER TOKEN (16 AN ANSWER)") {
		t.Errorf("one length:\n%s", s)
	}
}

// TestNginxRatios: each process but the bench's own, over nginx's CPU per
// token in the row of the same level and length, and printed per path.
func TestNginxRatios(t *testing.T) {
	row := func(path string, conc, tokens int, perToken map[string]time.Duration) pathbench.Result {
		cpu := map[string]time.Duration{}
		for role, d := range perToken {
			cpu[role] = d * 100 * time.Duration(tokens) // 100 queries
		}
		return pathbench.Result{Path: path, Concurrency: conc, Queries: 100, Tokens: tokens, Elapsed: time.Second, CPU: cpu}
	}
	us := time.Microsecond
	rows := []pathbench.Result{
		row("direct", 4, 16, map[string]time.Duration{"bench": 9 * us}),
		row("nginx", 4, 16, map[string]time.Duration{"bench": 9 * us, "nginx": 2 * us}),
		row("mtor", 4, 16, map[string]time.Duration{"bench": 9 * us, "bridge": 6 * us, "worker": 4 * us}),
		row("mtor-quic", 4, 16, map[string]time.Duration{"bench": 9 * us, "bridge": 0, "worker": 5 * us}), // the bridge under a tick
		row("go-proxy", 4, 16, map[string]time.Duration{"bench": 9 * us, "proxy": 3 * us}),
		row("mtor", 4, 256, map[string]time.Duration{"bench": 9 * us, "bridge": 6 * us}), // no nginx row of 256
		row("nginx", 8, 16, map[string]time.Duration{"bench": 9 * us, "nginx": 0}),       // too little CPU to count
		row("mtor", 8, 16, map[string]time.Duration{"bench": 9 * us, "bridge": 6 * us}),
	}
	slow := []pathbench.Result{
		row("nginx", 1, 16, map[string]time.Duration{"bench": 9 * us, "nginx": 20 * us}),
		row("mtor", 1, 16, map[string]time.Duration{"bench": 9 * us, "bridge": 90 * us}), // one stream: idle processes
		row("nginx", 1000, 16, map[string]time.Duration{"bench": 9 * us, "nginx": 10 * us}),
		row("mtor", 1000, 16, map[string]time.Duration{"bench": 9 * us, "bridge": 30 * us}),
	}
	tests := []struct {
		name string
		rows []pathbench.Result
		slow bool
		want []benchRatio
	}{
		{"rows", rows, false, []benchRatio{
			{Path: "mtor", Concurrency: 4, Tokens: 16, Process: "bridge", Ratio: 3},
			{Path: "mtor", Concurrency: 4, Tokens: 16, Process: "worker", Ratio: 2},
			{Path: "mtor-quic", Concurrency: 4, Tokens: 16, Process: "worker", Ratio: 2.5},
			{Path: "go-proxy", Concurrency: 4, Tokens: 16, Process: "proxy", Ratio: 1.5},
		}},
		{"slow streams", slow, true, []benchRatio{
			{Path: "mtor", Concurrency: 1000, Tokens: 16, Slow: true, Process: "bridge", Ratio: 3},
		}},
		{"no nginx", rows[2:6], false, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := nginxRatios(tc.rows, tc.slow); !slices.Equal(got, tc.want) {
				t.Errorf("nginxRatios = %+v, want %+v", got, tc.want)
			}
		})
	}
	rep := &benchReport{Rows: rows, Streams: slow}
	rep.VsNginx = vsNginx(rows, slow)
	var out bytes.Buffer
	if err := printBench(&out, rep); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CPU PER TOKEN OVER NGINX'S", "bridge 3.0×, worker 2.0×", "proxy 1.5×", "mtor (slow streams)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no %q in\n%s", want, out.String())
		}
	}
}

// TestRuns: the runs of consecutive equal elements, as the tables group
// a path's processes on one line.
func TestRuns(t *testing.T) {
	cases := []struct {
		name string
		xs   []int
		want [][]int
	}{
		{"none", nil, nil},
		{"one run", []int{1, 1, 1}, [][]int{{1, 1, 1}}},
		{"runs", []int{1, 1, 2, 3, 3}, [][]int{{1, 1}, {2}, {3, 3}}},
		{"apart, not merged", []int{1, 2, 1}, [][]int{{1}, {2}, {1}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got [][]int
			for r := range runs(tc.xs, func(a, b int) bool { return a == b }) {
				got = append(got, r)
			}
			if !slices.EqualFunc(got, tc.want, slices.Equal[[]int]) {
				t.Errorf("runs(%v) = %v, want %v", tc.xs, got, tc.want)
			}
		})
	}
	for r := range runs([]int{1, 2, 3}, func(a, b int) bool { return a == b }) {
		if len(r) != 1 || r[0] != 1 {
			t.Fatalf("first run %v", r)
		}
		break // a stopped loop must not yield again (that would panic)
	}
}
