package main

// End-to-end tests of the built binary: real `mtor node` processes on
// loopback, driven by real `mtor query` and `mtor peers` processes.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/mtor-swarm/mtor/node/api"
)

// e2eBin is the mtor binary built once by TestMain, and hostileBin the
// lying worker of the tests (internal/hostilepeer).
var e2eBin, hostileBin string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "mtor-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		if !testing.Short() {
			e2eBin = filepath.Join(dir, "mtor")
			hostileBin = filepath.Join(dir, "hostilepeer")
			for _, b := range [][]string{{e2eBin, "."}, {hostileBin, "./internal/hostilepeer"}} {
				build := exec.Command("go", "build", "-o", b[0], b[1])
				if out, err := build.CombinedOutput(); err != nil {
					fmt.Fprintf(os.Stderr, "building %s for the end-to-end tests: %v\n%s", b[1], err, out)
					return 1
				}
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

func needBinary(t *testing.T) {
	t.Helper()
	if e2eBin == "" {
		t.Skip("end-to-end tests need the binary; not built in -short mode")
	}
}

// proc is a running `mtor node`.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd

	mu     sync.Mutex
	stdout bytes.Buffer
	stderr bytes.Buffer
	values map[string][]string // "key: value" lines of stdout
	ready  chan struct{}       // closed at the ready line ("join:" for a node)
	exited chan struct{}       // closed when the process has ended
	state  *os.ProcessState
}

// syncWriter appends to a buffer under the proc's lock.
type syncWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// startNode starts `mtor node args...` and waits for its join line.
func startNode(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	return startNodeIn(t, name, nil, args...)
}

// startNodeIn is startNode run through prefix, e.g. `ip netns exec NS`.
func startNodeIn(t *testing.T, name string, prefix []string, args ...string) *proc {
	t.Helper()
	return startNodeLogged(t, name, prefix, "error", args...)
}

// startNodeLogged is startNodeIn with the node's log level (GOLOG_LOG_LEVEL)
// logLevel, for tests whose rare failures need the nodes' own account.
// MTOR_E2E_LOG_LEVEL overrides it.
func startNodeLogged(t *testing.T, name string, prefix []string, logLevel string, args ...string) *proc {
	t.Helper()
	p := launchNode(t, name, prefix, logLevel, args...)
	p.waitReady()
	return p
}

// launchNode starts the node without waiting for its join line, so that
// several start at once; waitReady waits for it.
func launchNode(t *testing.T, name string, prefix []string, logLevel string, args ...string) *proc {
	t.Helper()
	return launchProgram(t, name, "join", logLevel, append(append(slices.Clone(prefix), e2eBin, "node"), args...)...)
}

// launchProgram starts argv as launchNode starts a node: its stdout's
// "key: value" lines are its values, and readyKey's first line makes it
// ready.
func launchProgram(t *testing.T, name, readyKey, logLevel string, argv ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, values: map[string][]string{}, ready: make(chan struct{}), exited: make(chan struct{})}
	p.cmd = exec.Command(argv[0], argv[1:]...)
	if l := os.Getenv("MTOR_E2E_LOG_LEVEL"); l != "" {
		logLevel = l // e.g. "error,mtor/router=debug", to see why a test fails
	}
	p.cmd.Env = append(os.Environ(), "GOLOG_LOG_LEVEL="+logLevel)
	p.cmd.Stderr = syncWriter{&p.mu, &p.stderr}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.stdout.WriteString(line + "\n")
			if k, v, ok := strings.Cut(line, ": "); ok {
				p.values[k] = append(p.values[k], v)
				if k == readyKey && len(p.values[k]) == 1 {
					close(p.ready)
				}
			}
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	go func() {
		<-readDone
		_ = p.cmd.Wait()
		p.mu.Lock()
		p.state = p.cmd.ProcessState
		p.mu.Unlock()
		close(p.exited)
	}()
	t.Cleanup(func() {
		defer p.keepLog()
		select {
		case <-p.exited:
			return
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(30 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

// keepLog writes a failed test's process output whole to the folder
// MTOR_E2E_LOG_DIR names, when it names one: a failure message keeps only
// a tail, and a rare failure's cause is often further back.
func (p *proc) keepLog() {
	dir := os.Getenv("MTOR_E2E_LOG_DIR")
	if dir == "" || !p.t.Failed() {
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(p.t.Name() + "-" + p.name)
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
	if err := os.WriteFile(path, []byte(p.output()), 0o644); err != nil {
		p.t.Logf("keep %s's log: %v", p.name, err)
	}
}

// waitReady waits for the node's join line.
func (p *proc) waitReady() {
	p.t.Helper()
	select {
	case <-p.ready:
	case <-p.exited:
		p.t.Fatalf("node %s exited before its join line:\n%s", p.name, p.output())
	case <-time.After(90 * time.Second):
		p.t.Fatalf("node %s printed no join line in 90 s:\n%s", p.name, p.output())
	}
}

func (p *proc) value(key string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.values[key]) == 0 {
		p.t.Fatalf("node %s printed no %q line:\n%s", p.name, key, p.stdout.String())
	}
	return p.values[key][0]
}

func (p *proc) count(key string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.values[key])
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return "stdout:\n" + p.stdout.String() + "stderr:\n" + p.stderr.String()
}

// outputTail is output cut to its last n bytes of stderr, for a failure
// message after a long run of a verbose node.
func (p *proc) outputTail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.stderr.String()
	if len(e) > n {
		e = "…" + e[len(e)-n:]
	}
	return "stdout:\n" + p.stdout.String() + "stderr:\n" + e
}

// stop sends sig and returns the exit code.
func (p *proc) stop(sig os.Signal) int {
	p.t.Helper()
	code, err := p.signal(sig)
	if err != nil {
		p.t.Fatal(err)
	}
	return code
}

// signal sends sig and waits for the exit code; safe off the test goroutine.
func (p *proc) signal(sig os.Signal) (int, error) {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return 0, fmt.Errorf("signal %s: %w", p.name, err)
	}
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		return 0, fmt.Errorf("node %s did not exit within 60 s of %s:\n%s", p.name, sig, p.output())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state.ExitCode(), nil
}

// mtor runs a client command to completion.
func mtor(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return runArgv(t, append([]string{e2eBin}, args...)...)
}

// runArgv runs argv to completion.
func runArgv(t *testing.T, argv ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("%v: %v", argv, err)
	}
	return code, o.String(), e.String()
}

// nodeArgs are the flags every test node gets: its own data dir, loopback
// only, TCP, no mDNS, a short heartbeat so that the swarm converges quickly.
func nodeArgs(dir string, extra ...string) []string {
	return transports()[0].nodeArgs(dir, extra...)
}

// transport is one of a node's default transports. The swarm tests run on
// each alone, so that every connection of a run is surely of that kind: a
// node listening on both is dialled over QUIC first, and TCP would go
// untested (and QUIC's way of dying, silence instead of a reset, is not
// TCP's).
type transport struct{ name, listen string }

func transports() []transport {
	return []transport{{"tcp", "/ip4/127.0.0.1/tcp/0"}, {"quic", "/ip4/127.0.0.1/udp/0/quic-v1"}}
}

// onEachTransport runs test once on each transport, as subtests.
func onEachTransport(t *testing.T, test func(*testing.T, transport)) {
	for _, tr := range transports() {
		t.Run(tr.name, func(t *testing.T) { test(t, tr) })
	}
}

// nodeArgs are nodeArgs on this transport.
func (tr transport) nodeArgs(dir string, extra ...string) []string {
	return append([]string{"--data-dir", dir, "--listen", tr.listen, "--api", "127.0.0.1:0",
		"--no-mdns", "--announce-interval", "1s"}, extra...)
}

// waitWorkers waits until the node behind apiAddr lists the workers with
// model.
func waitWorkers(t *testing.T, apiAddr, model string, workers ...string) {
	t.Helper()
	c := api.NewClient(apiAddr)
	deadline := time.Now().Add(90 * time.Second)
	for {
		peers, err := c.Peers(t.Context())
		if err == nil && listsWorkers(peers, model, workers...) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("workers %v with model %s not in the peer table after 90 s (last: %+v, %v)", workers, model, peers, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func listsWorkers(peers []api.Peer, model string, workers ...string) bool {
	for _, w := range workers {
		found := false
		for _, p := range peers {
			for _, m := range p.Models {
				found = found || p.Peer == w && m.Name == model
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func TestE2ESwarm(t *testing.T) { onEachTransport(t, testE2ESwarm) }

func testE2ESwarm(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	const appOrigin = "http://app.example"
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect", "--bridge", "127.0.0.1:0",
		"--bridge-origin", appOrigin)...)
	join := boot.value("join")
	bootAPI := boot.value("api")
	if boot.count("join") != 1 || !strings.HasPrefix(join, "mtor1") {
		t.Fatalf("want exactly one join line with a token:\n%s", boot.output())
	}
	w1 := startNode(t, "worker1", tr.nodeArgs(filepath.Join(dir, "w1"), "--backend", "demo", "--join", join)...)
	w2Dir := filepath.Join(dir, "w2")
	w2 := startNode(t, "worker2", tr.nodeArgs(w2Dir, "--backend", "demo", "--join", join)...)
	workers := map[string]bool{w1.value("peer"): true, w2.value("peer"): true}
	waitWorkers(t, bootAPI, "demo", w1.value("peer"), w2.value("peer"))

	t.Run("query --api --json", func(t *testing.T) {
		code, stdout, stderr := mtor(t, "query", "--api", bootAPI, "--json", "hello from the test")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		var out map[string]any
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			t.Fatalf("stdout is not one JSON object: %v: %q", err, stdout)
		}
		peer, _ := out["peer"].(string)
		text, _ := out["text"].(string)
		if !workers[peer] {
			t.Errorf("answered by %q, not a worker", peer)
		}
		if !strings.Contains(text, "[demo answer from ") || !strings.Contains(text, "hello from the test") {
			t.Errorf("text %q", text)
		}
		for _, k := range []string{"ttft_ms", "total_ms", "model", "usage", "energy_mj", "attempts"} {
			if _, ok := out[k]; !ok {
				t.Errorf("--json output lacks %q: %s", k, stdout)
			}
		}
	})

	t.Run("query streams text", func(t *testing.T) {
		code, stdout, stderr := mtor(t, "query", "--api", bootAPI, "--model", "demo", "plain", "words")
		if code != 0 || !strings.HasPrefix(stdout, "[demo answer from ") || !strings.HasSuffix(stdout, "You said: plain words\n") {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
	})

	t.Run("peers --json", func(t *testing.T) {
		code, stdout, stderr := mtor(t, "peers", "--api", bootAPI, "--json")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, stderr)
		}
		var peers []api.Peer
		if err := json.Unmarshal([]byte(stdout), &peers); err != nil {
			t.Fatalf("not a JSON peer list: %v: %q", err, stdout)
		}
		if !listsWorkers(peers, "demo", w1.value("peer"), w2.value("peer")) {
			t.Fatalf("both workers with model demo wanted: %s", stdout)
		}
	})

	t.Run("peers table", func(t *testing.T) {
		code, stdout, _ := mtor(t, "peers", "--api", bootAPI)
		if code != 0 || !strings.Contains(stdout, "PEER") || !strings.Contains(stdout, w1.value("peer")) || !strings.Contains(stdout, "demo") {
			t.Fatalf("exit %d, table %q", code, stdout)
		}
	})

	t.Run("query --join", func(t *testing.T) {
		code, stdout, stderr := mtor(t, "query", "--join", join, "--listen", "/ip4/127.0.0.1/tcp/0", "--json", "from outside")
		out := queryAnswer(t, "query", code, stdout, stderr)
		if !workers[out.Peer] || !strings.Contains(out.Text, "You said: from outside") {
			t.Fatalf("output %+v", out)
		}
	})

	t.Run("unknown model is exit 1 with one line", func(t *testing.T) {
		code, stdout, stderr := mtor(t, "query", "--api", bootAPI, "--model", "no-such-model", "hi")
		if code != 1 || stdout != "" {
			t.Fatalf("exit %d, stdout %q", code, stdout)
		}
		if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "UNSUPPORTED") || !strings.Contains(stderr, "no-such-model") {
			t.Fatalf("stderr %q, want one line naming the error and the model", stderr)
		}
	})

	t.Run("usage error is exit 2", func(t *testing.T) {
		if code, _, stderr := mtor(t, "query", "--api", bootAPI); code != 2 || stderr == "" {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
	})

	t.Run("bridge serves", func(t *testing.T) {
		base := strings.TrimSuffix(boot.value("bridge"), "/")
		resp, err := http.Get(base + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"demo"`) {
			t.Fatalf("bridge /v1/models: %d %s", resp.StatusCode, b)
		}
	})

	t.Run("bridge allows only the --bridge-origin origins", func(t *testing.T) {
		base := strings.TrimSuffix(boot.value("bridge"), "/")
		get := func(origin string) (*http.Response, string) {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, base+"/v1/models", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Origin", origin)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp, string(b)
		}
		resp, body := get(appOrigin)
		if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != appOrigin || !strings.Contains(body, `"demo"`) {
			t.Fatalf("from %s: %d, Access-Control-Allow-Origin %q, %s", appOrigin, resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"), body)
		}
		resp, body = get("http://other.example")
		if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Access-Control-Allow-Origin") != "" {
			t.Fatalf("from another origin: %d, Access-Control-Allow-Origin %q, %s", resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"), body)
		}

		// The WebSocket of the web UI follows the same list.
		wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws"
		dial := func(origin string) (*http.Response, error) {
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			c, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {origin}}})
			if err == nil {
				c.Close(websocket.StatusNormalClosure, "")
			}
			return resp, err
		}
		if _, err := dial(appOrigin); err != nil {
			t.Fatalf("/ws from %s: %v", appOrigin, err)
		}
		if resp, err := dial("http://other.example"); err == nil || resp == nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("/ws from another origin: %v, %v; want 403", resp, err)
		}
	})

	t.Run("api id", func(t *testing.T) {
		id, err := api.NewClient(bootAPI).ID(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if id.Peer != boot.value("peer") || id.Join != join {
			t.Fatalf("id %+v", id)
		}
	})

	t.Run("SIGTERM exits 0 and the identity is reused", func(t *testing.T) {
		id := w2.value("peer")
		if code := w2.stop(syscall.SIGTERM); code != 0 {
			t.Fatalf("exit %d after SIGTERM:\n%s", code, w2.output())
		}
		fi, err := os.Stat(filepath.Join(w2Dir, "identity.key"))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("identity mode %v, want 0600", fi.Mode().Perm())
		}
		if code, stdout, _ := mtor(t, "id", "--data-dir", w2Dir); code != 0 || strings.TrimSpace(stdout) != id {
			t.Fatalf("mtor id: exit %d, %q, want %s", code, stdout, id)
		}
		again := startNode(t, "worker2-again", tr.nodeArgs(w2Dir, "--backend", "demo", "--join", join)...)
		if got := again.value("peer"); got != id {
			t.Fatalf("restarted with peer %s, want %s", got, id)
		}
		if code := again.stop(syscall.SIGINT); code != 0 {
			t.Fatalf("exit %d after SIGINT:\n%s", code, again.output())
		}
	})
}

// A worker stopped with SIGTERM finishes the query it is answering before
// it exits, and exits 0.
func TestE2EGracefulShutdownFinishesQuery(t *testing.T) {
	onEachTransport(t, testE2EGracefulShutdownFinishesQuery)
}

func testE2EGracefulShutdownFinishesQuery(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	// 40 words at 100 ms each: the answer takes about 4 s.
	w := startNode(t, "slow-worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo:delay=100ms,model=slow",
		"--join", boot.value("join"), "--grace", "2m")...)
	waitWorkers(t, boot.value("api"), "slow", w.value("peer"))

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	prompt := strings.TrimSpace(strings.Repeat("word ", 40))
	q := exec.CommandContext(ctx, e2eBin, "query", "--api", boot.value("api"), "--model", "slow", prompt)
	var stderr bytes.Buffer
	q.Stderr = &stderr
	out, err := q.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for the first streamed bytes: the worker is answering now.
	first := make([]byte, 1)
	if _, err := io.ReadFull(out, first); err != nil {
		t.Fatalf("no output from the query: %v; %s", err, stderr.String())
	}
	type exit struct {
		code int
		err  error
	}
	stopped := make(chan exit, 1)
	go func() {
		code, err := w.signal(syscall.SIGTERM)
		stopped <- exit{code, err}
	}()
	rest, _ := io.ReadAll(out)
	if err := q.Wait(); err != nil {
		t.Fatalf("query failed while the worker drained: %v; %s", err, stderr.String())
	}
	text := string(first) + string(rest)
	if !strings.HasSuffix(text, "You said: "+prompt+"\n") {
		t.Fatalf("answer cut short: %q", text)
	}
	if x := <-stopped; x.err != nil || x.code != 0 {
		t.Fatalf("worker exit %d (%v):\n%s", x.code, x.err, w.output())
	}
}

// A node that cannot start says why in one line on stderr and exits 1:
// no multi-line library logs before it. 192.0.2.1 (TEST-NET-1) is on no
// machine, so binding it fails at once and sends nothing.
func TestE2EStartupFailureIsOneLine(t *testing.T) {
	needBinary(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	var env []string // the default log levels, whatever the test runner's
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GOLOG_") {
			env = append(env, kv)
		}
	}
	for _, tc := range []struct{ listen, want string }{
		{"/ip4/192.0.2.1/tcp/0", "192.0.2.1"},
		{"/ip4/192.0.2.1/udp/0/quic-v1", "192.0.2.1"},
		{fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", busyPort), "address already in use"},
	} {
		t.Run(tc.listen, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, e2eBin, "node", "--data-dir", t.TempDir(), "--listen", tc.listen,
				"--api", "off", "--no-detect", "--no-mdns")
			cmd.Env = env
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != exitError {
				t.Fatalf("%v, want exit 1; stderr %q", err, stderr.String())
			}
			line := stderr.String()
			if strings.Count(line, "\n") != 1 || !strings.HasPrefix(line, "mtor node: ") || !strings.Contains(line, tc.want) {
				t.Fatalf("stderr %q, want one line \"mtor node: ...\" naming %q", line, tc.want)
			}
			if stdout.Len() != 0 {
				t.Fatalf("stdout %q, want nothing", stdout.String())
			}
		})
	}
}

// A worker process that freezes (SIGSTOP: its connections stay up, it
// never answers) costs queries a few seconds, not their deadline: each is
// answered by the live worker well within a timeout far shorter than the
// time the router would wait for a silent stream.
func TestE2EFrozenWorkerIsRoutedAround(t *testing.T) {
	onEachTransport(t, testE2EFrozenWorkerIsRoutedAround)
}

func testE2EFrozenWorkerIsRoutedAround(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	live := startNode(t, "live", tr.nodeArgs(filepath.Join(dir, "live"), "--backend", "demo", "--join", boot.value("join"))...)
	frozen := startNode(t, "frozen", tr.nodeArgs(filepath.Join(dir, "frozen"), "--backend", "demo", "--join", boot.value("join"))...)
	waitWorkers(t, boot.value("api"), "demo", live.value("peer"), frozen.value("peer"))

	if err := frozen.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = frozen.cmd.Process.Signal(syscall.SIGCONT) })
	for i := 0; i < 6; i++ {
		code, stdout, stderr := mtor(t, "query", "--api", boot.value("api"), "--model", "demo", "--timeout", "20s", "--json", fmt.Sprintf("are you there %d", i))
		if code != 0 {
			t.Fatalf("query %d with a frozen worker in the swarm: exit %d: %s", i, code, stderr)
		}
		var out struct{ Peer string }
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			t.Fatal(err)
		}
		if out.Peer != live.value("peer") {
			t.Fatalf("query %d answered by %s, want the live worker", i, out.Peer)
		}
	}
}

// A worker process killed with SIGKILL (no shutdown at all) while 200
// queries run at concurrency 8: every query ends with a whole answer, and
// the dead worker leaves the peer table within a few heartbeats.
func TestE2EKilledWorkerLosesNoQuery(t *testing.T) {
	onEachTransport(t, testE2EKilledWorkerLosesNoQuery)
}

func testE2EKilledWorkerLosesNoQuery(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	var workers []*proc
	var ids []string
	for i := 0; i < 3; i++ {
		w := startNode(t, fmt.Sprintf("worker%d", i), tr.nodeArgs(filepath.Join(dir, fmt.Sprint("w", i)),
			"--backend", "demo:delay=2ms", "--join", boot.value("join"))...)
		workers = append(workers, w)
		ids = append(ids, w.value("peer"))
	}
	waitWorkers(t, boot.value("api"), "demo", ids...)
	victim := workers[1]

	c := api.NewClient(boot.value("api"))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	jobs := make(chan int)
	var mu sync.Mutex
	var failures []string
	done, byPeer := 0, map[string]int{}
	var killOnce sync.Once
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				prompt := fmt.Sprintf("query %d of the kill test", i)
				var text strings.Builder
				d, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Prompt: prompt}, func(ev *api.Event) error {
					switch ev.Event {
					case api.EventRestart:
						text.Reset()
					case api.EventChunk:
						text.WriteString(ev.Text)
					}
					return nil
				})
				mu.Lock()
				switch {
				case err != nil:
					failures = append(failures, fmt.Sprintf("%d: %v", i, err))
				case !strings.HasSuffix(text.String(), prompt) || strings.Count(text.String(), "[demo answer") != 1:
					failures = append(failures, fmt.Sprintf("%d: answer %q", i, text.String()))
				default:
					byPeer[d.Peer]++
				}
				done++
				n := done
				mu.Unlock()
				if n == 50 {
					killOnce.Do(func() { _ = victim.cmd.Process.Signal(syscall.SIGKILL) })
				}
			}
		}()
	}
	for i := 0; i < 200; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of 200 queries failed after SIGKILL of a worker: %v", len(failures), failures)
	}
	t.Logf("answers per worker: %v", byPeer)

	// Gone from the table within a few heartbeats (interval 1 s here).
	deadline := time.Now().Add(10 * time.Second)
	for {
		peers, err := c.Peers(ctx)
		if err == nil && !listsWorkers(peers, "demo", victim.value("peer")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("killed worker still in the peer table after 10 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// queryAnswer is the answer of a `mtor query --json` that exited with
// code; what names the query in a failure.
func queryAnswer(t *testing.T, what string, code int, stdout, stderr string) queryOutput {
	t.Helper()
	if code != exitOK {
		t.Fatalf("%s: exit %d: %s", what, code, stderr)
	}
	var out queryOutput
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("%s: stdout is not one JSON object: %v: %q", what, err, stdout)
	}
	return out
}
