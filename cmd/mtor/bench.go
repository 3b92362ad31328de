package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"iter"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// benchPath is one way from the load generator to the backend, with the
// processes on it whose CPU time counts for it; measure adds the bench's
// own, which every path has.
type benchPath struct {
	name  string
	url   string
	procs map[string]int // role -> pid
}

// benchTransports are the transports a bridge → worker pair of the bench
// can run on: the listen address of both nodes and the row's name. TCP
// keeps the row's historical name; QUIC is what two default nodes dial
// first.
var benchTransports = map[string]struct{ listen, path string }{
	"tcp":  {"/ip4/127.0.0.1/tcp/0", "mtor"},
	"quic": {"/ip4/127.0.0.1/udp/0/quic-v1", "mtor-quic"},
}

// benchReport is what `mtor bench --json` prints.
type benchReport struct {
	Rows    []pathbench.Result `json:"rows"`
	Streams []pathbench.Result `json:"streams,omitempty"`
	// Splits: with rows of several answer lengths, each process's CPU per
	// answer and per token, fitted over them for each path and level.
	Splits []benchSplit `json:"splits,omitempty"`
	// VsNginx: with nginx installed, each process's CPU per token over
	// nginx's in the row of the same level and length (issue 12's goal:
	// the bridge within 2×).
	VsNginx []benchRatio `json:"vs_nginx,omitempty"`
}

// benchRatio is one process's CPU per token over nginx's, on one path at
// one level and answer length; Slow: in the slow streams' rows.
type benchRatio struct {
	Path        string  `json:"path"`
	Concurrency int     `json:"concurrency"`
	Tokens      int     `json:"tokens"`
	Slow        bool    `json:"slow,omitempty"`
	Process     string  `json:"process"`
	Ratio       float64 `json:"ratio"`
}

// nginxRatios compares every process but the bench's own (which every
// row has) with nginx in the row of the same level and length; none where
// nginx, or the process, has no row or too little CPU to count (under a
// clock tick in a small row). Slow rows of one stream are left out:
// their processes are idle most of the row.
func nginxRatios(rows []pathbench.Result, slow bool) []benchRatio {
	type key struct{ conc, tokens int }
	nginx := map[key]time.Duration{}
	for _, r := range rows {
		if r.Path == "nginx" {
			nginx[key{r.Concurrency, r.Tokens}] = r.CPUPerToken("nginx")
		}
	}
	var out []benchRatio
	for _, r := range rows {
		base := nginx[key{r.Concurrency, r.Tokens}]
		if r.Path == "nginx" || base <= 0 || (slow && r.Concurrency <= 1) {
			continue
		}
		for _, role := range slices.Sorted(maps.Keys(r.CPU)) {
			per := r.CPUPerToken(role)
			if role == "bench" || per <= 0 {
				continue
			}
			out = append(out, benchRatio{Path: r.Path, Concurrency: r.Concurrency, Tokens: r.Tokens, Slow: slow,
				Process: role, Ratio: float64(per) / float64(base)})
		}
	}
	return out
}

// vsNginx is the report's comparison with nginx: the rows' ratios, then
// the slow streams'.
func vsNginx(rows, streams []pathbench.Result) []benchRatio {
	return append(nginxRatios(rows, false), nginxRatios(streams, true)...)
}

// benchSplit is one process's split on one path at one concurrency.
type benchSplit struct {
	Path        string `json:"path"`
	Concurrency int    `json:"concurrency"`
	Process     string `json:"process"`
	pathbench.CPUSplit
}

// splitRows fits the split of every process of every path and level
// over the rows' answer lengths; nothing with one length.
func splitRows(rows []pathbench.Result) []benchSplit {
	type group struct {
		path string
		conc int
	}
	var order []group
	byGroup := map[group][]pathbench.Result{}
	for _, r := range rows {
		g := group{r.Path, r.Concurrency}
		if _, seen := byGroup[g]; !seen {
			order = append(order, g)
		}
		byGroup[g] = append(byGroup[g], r)
	}
	var out []benchSplit
	for _, g := range order {
		for _, role := range slices.Sorted(maps.Keys(byGroup[g][0].CPU)) {
			if s, ok := pathbench.SplitCPU(byGroup[g], role); ok {
				out = append(out, benchSplit{Path: g.path, Concurrency: g.conc, Process: role, CPUSplit: s})
			}
		}
	}
	return out
}

func runBench(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "bench", "[--queries N] [--concurrency 1,16,64] [--tokens 16[,256]] [--streams N] [--transport tcp,quic] [--node-env KEY=VALUE]... [--json]")
	queries := fs.Int("queries", 2000, "queries per path and concurrency")
	conc := fs.String("concurrency", "1,16,64", "comma-separated concurrency levels")
	tokens := fs.String("tokens", strconv.Itoa(pathbench.DefaultTokens), fmt.Sprintf("comma-separated answer lengths, 1 to %d tokens; with two or more, each process's CPU is also split into per answer and per token (the slow streams, %s apart, take the first)", pathbench.MaxTokens, pathbench.SlowInterval))
	streams := fs.Int("streams", 1000, "concurrent slow streams for the TTFT row (0: skip it)")
	noNginx := fs.Bool("no-nginx", false, "leave nginx out even when it is installed")
	transports := fs.String("transport", "tcp,quic", "comma-separated transports of the bridge → worker path, a pair of nodes each: tcp (row mtor), quic (row mtor-quic)")
	asJSON := fs.Bool("json", false, "print the results as JSON")
	var nodeEnv []string
	fs.Func("node-env", "KEY=VALUE added to the environment of the bench's mtor node processes, not the baselines' (repeatable), e.g. GOMAXPROCS=1", func(v string) error {
		k, _, ok := strings.Cut(v, "=")
		if !ok || !envName(k) {
			return fmt.Errorf("want KEY=VALUE, got %q", v)
		}
		nodeEnv = append(nodeEnv, v)
		return nil
	})
	serveProxy := fs.String("serve-proxy", "", "internal: serve Go's reverse proxy to this upstream URL (the bench starts it as its own process)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if *serveProxy != "" {
		return serveBenchProxy(ctx, e, *serveProxy)
	}
	if *queries <= 0 {
		return usagef("--queries must be > 0")
	}
	var lengths []int
	for _, s := range strings.Split(*tokens, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > pathbench.MaxTokens || slices.Contains(lengths, n) {
			return usagef("--tokens %q: want distinct lengths of 1 to %d tokens", *tokens, pathbench.MaxTokens)
		}
		lengths = append(lengths, n)
	}
	if *streams < 0 || *streams > 4096 {
		return usagef("--streams must be between 0 and 4096")
	}
	var levels []int
	for _, s := range strings.Split(*conc, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || c <= 0 || c > 1024 {
			return usagef("--concurrency %q: want positive integers up to 1024", *conc)
		}
		levels = append(levels, c)
	}
	var pairs []string
	for _, s := range strings.Split(*transports, ",") {
		s = strings.TrimSpace(s)
		if _, ok := benchTransports[s]; !ok || slices.Contains(pairs, s) {
			return usagef("--transport %q: want tcp, quic or tcp,quic", *transports)
		}
		pairs = append(pairs, s)
	}

	rep, err := benchPaths(ctx, e, benchSetup{queries: *queries, levels: levels, tokens: lengths, streams: *streams, transports: pairs, nginx: !*noNginx, nodeEnv: nodeEnv})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	return printBench(e.stdout, rep)
}

// serveBenchProxy is the reverse-proxy process of the bench: it prints
// its address and serves until stdin closes or a signal.
func serveBenchProxy(ctx context.Context, e *env, upstream string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		_, _ = io.Copy(io.Discard, e.stdin) // the bench closes it to stop us
		cancel()
	}()
	fmt.Fprintf(e.stdout, "proxy: http://%s\n", ln.Addr())
	return pathbench.ServeProxy(ctx, ln, upstream)
}

// envName reports whether k can name a variable of `mtor bench
// --node-env`: letters, digits and '_', not starting with a digit.
func envName(k string) bool {
	for i, c := range k {
		if c != '_' && !('A' <= c && c <= 'Z') && !('a' <= c && c <= 'z') && (i == 0 || c < '0' || c > '9') {
			return false
		}
	}
	return k != ""
}

// benchSetup is what `mtor bench` runs: its flags, checked.
type benchSetup struct {
	queries    int
	levels     []int
	tokens     []int // answer lengths: every level of every path at each; the slow streams at the first
	streams    int
	transports []string
	nginx      bool
	nodeEnv    []string // KEY=VALUE for the node processes only
}

// benchPaths starts the backend and every path to it, then measures each
// path at each level, and the slow streams.
func benchPaths(ctx context.Context, e *env, set benchSetup) (*benchReport, error) {
	be, err := pathbench.StartBackend()
	if err != nil {
		return nil, err
	}
	defer be.Close()
	tmp, err := os.MkdirTemp("", "mtor-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("bench: finding the mtor binary: %w", err)
	}

	paths := []benchPath{{name: "direct", url: be.URL()}}
	var children []*benchChild
	defer func() {
		for _, c := range slices.Backward(children) {
			c.stop()
		}
	}()
	start := func(name string, env []string, args ...string) (*benchChild, error) {
		c, err := startBenchChild(ctx, self, env, args...)
		if err != nil {
			return nil, fmt.Errorf("bench: %s: %w", name, err)
		}
		children = append(children, c)
		return c, nil
	}

	px, err := start("go proxy", nil, "bench", "--serve-proxy", be.URL())
	if err != nil {
		return nil, err
	}
	paths = append(paths, benchPath{name: "go-proxy", url: px.values["proxy"], procs: map[string]int{"proxy": px.pid()}})

	if bin := pathbench.NginxPath(); set.nginx && bin != "" {
		ng, err := pathbench.StartNginx(ctx, bin, strings.TrimPrefix(be.URL(), "http://"))
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		defer ng.Close()
		pid, err := ng.WorkerPID()
		if err != nil {
			return nil, fmt.Errorf("bench: %w", err)
		}
		paths = append(paths, benchPath{name: "nginx", url: ng.URL(), procs: map[string]int{"nginx": pid}})
	} else {
		fmt.Fprintln(e.stderr, "bench: nginx is not installed (or --no-nginx): its row is left out")
	}

	slots := strconv.Itoa(max(slices.Max(set.levels), set.streams) + 64)
	nodeArgs := func(dir, listen, swarm string, extra ...string) []string {
		return append([]string{"node", "--data-dir", filepath.Join(tmp, dir), "--listen", listen,
			"--no-mdns", "--api", "off", "--swarm", swarm, "--log-level", "error"}, extra...)
	}
	bridgeArgs := []string{"--bridge", "127.0.0.1:0", "--bridge-queue", slots, "--bridge-queue-per-client", slots}
	backendArgs := []string{"--backend", "openai=" + be.URL(), "--max-concurrency", slots, "--max-queue", slots}
	for _, tr := range set.transports {
		bt := benchTransports[tr]
		// Each pair its own swarm, listening on its transport alone: the
		// bridge can reach its worker on nothing else.
		swarm := "bench-two-" + tr
		w, err := start(tr+" worker node", set.nodeEnv, nodeArgs("worker-"+tr, bt.listen, swarm, backendArgs...)...)
		if err != nil {
			return nil, err
		}
		b, err := start(tr+" bridge node", set.nodeEnv, append(nodeArgs("bridge-"+tr, bt.listen, swarm, "--no-detect", "--join", w.values["join"]), bridgeArgs...)...)
		if err != nil {
			return nil, err
		}
		paths = append(paths, benchPath{name: bt.path, url: strings.TrimSuffix(b.values["bridge"], "/"), procs: map[string]int{"bridge": b.pid(), "worker": w.pid()}})
	}
	one, err := start("one node", set.nodeEnv, append(nodeArgs("one", benchTransports["tcp"].listen, "bench-one", backendArgs...), bridgeArgs...)...)
	if err != nil {
		return nil, err
	}
	paths = append(paths, benchPath{name: "mtor1", url: strings.TrimSuffix(one.values["bridge"], "/"), procs: map[string]int{"node": one.pid()}})

	for _, p := range paths {
		if err := warmUp(ctx, p); err != nil {
			return nil, err
		}
	}
	rep := &benchReport{}
	for _, tokens := range set.tokens {
		for _, c := range set.levels {
			for _, p := range paths {
				r, err := measure(ctx, p, pathbench.Model, set.queries, c, tokens)
				if err != nil {
					return nil, err
				}
				rep.Rows = append(rep.Rows, r)
			}
		}
	}
	rep.Splits = splitRows(rep.Rows)
	if set.streams > 0 {
		for _, p := range paths {
			for _, n := range []int{1, set.streams} {
				r, err := measure(ctx, p, pathbench.SlowModel, max(n, 20), n, set.tokens[0])
				if err != nil {
					return nil, err
				}
				rep.Streams = append(rep.Streams, r)
			}
		}
	}
	rep.VsNginx = vsNginx(rep.Rows, rep.Streams)
	return rep, nil
}

// warmUp waits until p answers (the bridge learns of the worker through
// the swarm) and warms its connections.
func warmUp(ctx context.Context, p benchPath) error {
	cl := pathbench.NewClient(p.url, pathbench.Model, 8)
	defer cl.Close()
	deadline := time.Now().Add(time.Minute)
	for {
		qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, _, err := cl.Query(qctx)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bench: %s does not answer within a minute: %w", p.name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	cl.Run(ctx, 200, 8)
	return ctx.Err()
}

// measure runs one row, answers of tokens tokens, and the CPU time of p's processes over it.
func measure(ctx context.Context, p benchPath, model string, queries, conc, tokens int) (pathbench.Result, error) {
	cl := pathbench.NewClient(p.url, model, conc, pathbench.WithTokens(tokens))
	defer cl.Close()
	// The load generator and the backend share this process, on every
	// path: its CPU is what a row needs besides the path's own processes.
	procs := map[string]int{"bench": os.Getpid()}
	maps.Copy(procs, p.procs)
	before, err := procsCPU(procs)
	if err != nil {
		return pathbench.Result{}, err
	}
	r := cl.Run(ctx, queries, conc)
	if err := ctx.Err(); err != nil {
		return r, err
	}
	r.Path = p.name
	if r.CPU, err = procsCPU(procs); err != nil {
		return r, err
	}
	for role, t := range before {
		r.CPU[role] -= t
	}
	return r, nil
}

// procsCPU is the CPU time each process of procs (role -> pid) has used.
func procsCPU(procs map[string]int) (map[string]time.Duration, error) {
	cpu := make(map[string]time.Duration, len(procs))
	for role, pid := range procs {
		t, err := pathbench.ProcCPU(pid)
		if err != nil {
			return nil, err
		}
		cpu[role] = t
	}
	return cpu, nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

func printBench(w io.Writer, rep *benchReport) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	var lengths []int
	for _, r := range rep.Rows {
		if !slices.Contains(lengths, r.Tokens) {
			lengths = append(lengths, r.Tokens)
		}
	}
	// One length: the table as it always was, the length in its header;
	// more: a column of them.
	tokensCol := func(int) string { return "" }
	if len(lengths) == 1 {
		fmt.Fprintf(tw, "PATH\tCONC\tQUERIES\tERRORS\tP50\tADDED P50\tP99\tQUERIES/S\tVS DIRECT\tCORES\tCPU PER TOKEN (%d AN ANSWER)\n", lengths[0])
	} else {
		tokensCol = func(n int) string { return strconv.Itoa(n) + "\t" }
		fmt.Fprintf(tw, "PATH\tCONC\tTOKENS\tQUERIES\tERRORS\tP50\tADDED P50\tP99\tQUERIES/S\tVS DIRECT\tCORES\tCPU PER TOKEN\n")
	}
	type rowKey struct{ conc, tokens int }
	direct := map[rowKey]pathbench.Result{}
	for _, r := range rep.Rows {
		if r.Path == "direct" {
			direct[rowKey{r.Concurrency, r.Tokens}] = r
		}
	}
	for _, r := range rep.Rows {
		d := direct[rowKey{r.Concurrency, r.Tokens}]
		added, ratio := "-", "-"
		if r.Path != "direct" {
			added = fmt.Sprintf("%+.2f ms", float64(r.P50-d.P50)/float64(time.Millisecond))
			ratio = fmt.Sprintf("%.2f", r.QPS()/d.QPS())
		}
		fmt.Fprintf(tw, "%s\t%d\t%s%d\t%d\t%s\t%s\t%s\t%.0f\t%s\t%.2f\t%s\n", r.Path, r.Concurrency, tokensCol(r.Tokens), r.Queries, r.Errors,
			ms(r.P50), added, ms(r.P99), r.QPS(), ratio, r.Cores(), cpuPerToken(r))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(rep.Splits) > 0 {
		if err := printSplits(tw, rep.Splits, lengths); err != nil {
			return err
		}
	}
	if len(rep.Streams) > 0 {
		fmt.Fprintf(tw, "\nSLOW STREAMS (%d tokens %s apart)\tCONC\tERRORS\tTTFT P50\tTTFT P99\tTOTAL P99\tCPU PER TOKEN\n", rep.Streams[0].Tokens, pathbench.SlowInterval)
		for _, r := range rep.Streams {
			// One stream at a time leaves the processes idle most of
			// the row: its CPU is theirs at rest, not the stream's.
			cpu := "-"
			if r.Concurrency > 1 {
				cpu = cpuPerToken(r)
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\n", r.Path, r.Concurrency, r.Errors, ms(r.TTFTP50), ms(r.TTFTP99), ms(r.P99), cpu)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if len(rep.VsNginx) > 0 {
		if err := printRatios(tw, rep.VsNginx); err != nil {
			return err
		}
	}
	for _, r := range append(slices.Clone(rep.Rows), rep.Streams...) {
		if r.FirstError != "" {
			fmt.Fprintf(w, "%s at %d: first error: %s\n", r.Path, r.Concurrency, r.FirstError)
		}
	}
	return nil
}

// printSplits prints the splits a path's processes at a level on one
// line: "role A µs +B µs/token" each.
func printSplits(tw *tabwriter.Writer, splits []benchSplit, lengths []int) error {
	ls := make([]string, len(lengths))
	for i, n := range lengths {
		ls[i] = strconv.Itoa(n)
	}
	fmt.Fprintf(tw, "\nCPU PER ANSWER + PER TOKEN (answers of %s tokens)\tCONC\tEACH PROCESS\n", strings.Join(ls, ", "))
	for run := range runs(splits, func(a, b benchSplit) bool { return a.Path == b.Path && a.Concurrency == b.Concurrency }) {
		parts := make([]string, len(run))
		for i, s := range run {
			parts[i] = fmt.Sprintf("%s %.0f µs %+.2f µs/token", s.Process,
				float64(s.PerAnswer)/float64(time.Microsecond), float64(s.PerToken)/float64(time.Microsecond))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\n", run[0].Path, run[0].Concurrency, strings.Join(parts, ", "))
	}
	return tw.Flush()
}

// printRatios prints each path's processes at a level and length on one
// line: "role N×" each, N their CPU per token over nginx's.
func printRatios(tw *tabwriter.Writer, ratios []benchRatio) error {
	fmt.Fprintf(tw, "\nCPU PER TOKEN OVER NGINX'S\tCONC\tTOKENS\tEACH PROCESS\n")
	sameRow := func(a, b benchRatio) bool {
		return a.Path == b.Path && a.Concurrency == b.Concurrency && a.Tokens == b.Tokens && a.Slow == b.Slow
	}
	for run := range runs(ratios, sameRow) {
		parts := make([]string, len(run))
		for i, r := range run {
			parts[i] = fmt.Sprintf("%s %.1f×", r.Process, r.Ratio)
		}
		name := run[0].Path
		if run[0].Slow {
			name += " (slow streams)"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", name, run[0].Concurrency, run[0].Tokens, strings.Join(parts, ", "))
	}
	return tw.Flush()
}

// runs yields the runs of consecutive elements of xs that same puts
// together: a table's line per path and level.
func runs[T any](xs []T, same func(a, b T) bool) iter.Seq[[]T] {
	return func(yield func([]T) bool) {
		for i := 0; i < len(xs); {
			j := i + 1
			for j < len(xs) && same(xs[i], xs[j]) {
				j++
			}
			if !yield(xs[i:j]) {
				return
			}
			i = j
		}
	}
}

// cpuPerToken is "role µs" for each process of the row.
func cpuPerToken(r pathbench.Result) string {
	if len(r.CPU) == 0 {
		return "-"
	}
	var parts []string
	for _, role := range slices.Sorted(maps.Keys(r.CPU)) {
		parts = append(parts, fmt.Sprintf("%s %.1f µs", role, float64(r.CPUPerToken(role))/float64(time.Microsecond)))
	}
	return strings.Join(parts, ", ")
}

// benchChild is a process of the bench: a node or the Go proxy, started
// from this binary. Its "key: value" startup lines are read until the
// line that says it is ready.
type benchChild struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	values map[string]string
	stderr *lockedBuffer
	done   chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 64<<10 {
		return len(p), nil // bounded: the start of the story is what matters
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startBenchChild(ctx context.Context, bin string, env []string, args ...string) (*benchChild, error) {
	c := &benchChild{cmd: exec.Command(bin, args...), values: map[string]string{}, stderr: &lockedBuffer{}, done: make(chan struct{})}
	if len(env) > 0 {
		c.cmd.Env = append(os.Environ(), env...) // a later KEY= wins
	}
	c.cmd.Stderr = c.stderr
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = c.cmd.Wait(); close(c.done) }()
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(out)
		signalled := false
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ": ")
			if !ok || signalled {
				continue
			}
			c.values[k] = v
			if k == "join" || k == "proxy" {
				signalled = true
				ready <- nil
			}
		}
		if !signalled {
			ready <- errors.New("exited before it was ready")
		}
	}()
	select {
	case err = <-ready:
	case <-time.After(time.Minute):
		err = errors.New("not ready within a minute")
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		c.stop()
		return nil, fmt.Errorf("%w: %s", err, strings.TrimSpace(c.stderr.String()))
	}
	return c, nil
}

func (c *benchChild) pid() int { return c.cmd.Process.Pid }

// stop ends the child: stdin closed (the proxy) and SIGINT (a node), then
// SIGKILL after 10 s.
func (c *benchChild) stop() {
	_ = c.stdin.Close()
	_ = c.cmd.Process.Signal(os.Interrupt)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}
