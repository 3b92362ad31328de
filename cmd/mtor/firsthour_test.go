package main

// End-to-end tests of what a volunteer sees when something is wrong: each
// failure is said at once, in one line, without --log-level.

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/protocol"
)

// waitOutput waits until the node's stdout or stderr holds want.
func (p *proc) waitOutput(want string, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(p.output(), want) {
		if time.Now().After(deadline) {
			p.t.Fatalf("node %s did not print %q within %s:\n%s", p.name, want, within, p.output())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stderrText is what the node wrote on stderr so far.
func (p *proc) stderrText() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// freePort is a loopback port of network ("tcp", or "udp" for QUIC)
// that nothing listens on now.
func freePort(t *testing.T, network string) int {
	t.Helper()
	var (
		addr net.Addr
		end  func() error
	)
	if network == "udp" {
		c, err := net.ListenPacket(network, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr, end = c.LocalAddr(), c.Close
	} else {
		ln, err := net.Listen(network, "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr, end = ln.Addr(), ln.Close
	}
	defer end()
	return int(netip.MustParseAddrPort(addr.String()).Port())
}

// A backend that does not answer is said at start, on stdout and as a
// warning on stderr; the node's own row in `mtor peers` shows it although
// the node serves nothing; when the server comes up, the node says so.
func TestE2EDeadBackendIsSaid(t *testing.T) {
	needBinary(t)
	port := freePort(t, "tcp")
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	n := startNode(t, "worker", nodeArgs(t.TempDir(), "--backend", "ollama="+url)...)

	state := "ollama " + url + " unreachable (connection refused); retrying every 10s"
	if !strings.Contains(n.output(), "backend: "+state+"\n") {
		t.Fatalf("start-up output lacks %q:\n%s", state, n.output())
	}
	// stderr is another pipe: it may trail the join line a little.
	n.waitOutput("warning: backend "+state+"\n", 5*time.Second)
	if !strings.Contains(n.stderrText(), "warning: backend "+state+"\n") {
		t.Fatalf("the warning is not on stderr:\n%s", n.output())
	}
	for _, line := range []string{"roles: worker", "reachability: loopback only (this machine)", "peers: 0 connected"} {
		if !strings.Contains(n.output(), line+"\n") {
			t.Errorf("start-up output lacks %q", line)
		}
	}

	code, stdout, stderr := mtor(t, "peers", "--api", n.value("api"))
	if code != 0 {
		t.Fatalf("peers: exit %d: %s", code, stderr)
	}
	for _, want := range []string{n.value("peer") + " (self)", "this node's backend: ollama " + url + " unreachable (connection refused)", "no workers known yet"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("peers output lacks %q:\n%s", want, stdout)
		}
	}

	// The model server starts: the next probe (10 s) finds it.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Skipf("the port was taken in between: %v", err)
	}
	srv := &http.Server{Handler: fakeOllama()}
	go srv.Serve(ln)
	defer srv.Close()
	n.waitOutput("backend: ollama "+url+" up: 1 model (tiny:1b)", 25*time.Second)
}

// fakeOllama answers the calls of the ollama backend's probe and model list.
func fakeOllama() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/api/version", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"version":"0.0.0-test"}`)
	})
	mux.HandleFunc("/api/tags", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"models":[{"name":"tiny:1b","model":"tiny:1b"}]}`)
	})
	mux.HandleFunc("/api/show", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"capabilities":["completion"],"model_info":{}}`)
	})
	return mux
}

// A join address that does not answer is said at once, and the node keeps
// trying: when the join peer comes up, the node joins it and says so.
// `mtor query --join` to a dead address says that it could not connect.
func TestE2EDeadJoinIsSaid(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	bootDir := filepath.Join(dir, "boot")
	code, stdout, stderr := mtor(t, "id", "--data-dir", bootDir)
	if code != 0 {
		t.Fatalf("id: exit %d: %s", code, stderr)
	}
	port := freePort(t, "tcp")
	dead := fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/%s", port, strings.TrimSpace(stdout))

	start := time.Now()
	code, _, stderr = mtor(t, "query", "--join", dead, "--listen", "/ip4/127.0.0.1/tcp/0", "hello")
	if code != exitError || !strings.Contains(stderr, "could not connect to the swarm: no join peer answered (/ip4/127.0.0.1/tcp/") ||
		!strings.Contains(stderr, "connection refused") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("query --join dead: exit %d, stderr %q", code, stderr)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("query --join dead took %s", d)
	}

	w := startNode(t, "worker", nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", dead)...)
	w.waitOutput("warning: no join peer answered (/ip4/127.0.0.1/tcp/", 10*time.Second)
	if !strings.Contains(w.stderrText(), "retrying with backoff") {
		t.Fatalf("the warning does not say that the node retries:\n%s", w.output())
	}
	id, err := api.NewClient(w.value("api")).ID(t.Context())
	if err != nil || !id.Joining || id.JoinError == "" || id.Gossip == nil {
		t.Fatalf("/v1/id = %+v, %v; want joining with the join error, and gossip counters", id, err)
	}

	// The join peer comes up on that address: the worker's next retry
	// (2 s, then 4 s, ...) reaches it.
	boot := startNode(t, "bootstrap", "--data-dir", bootDir, "--listen", fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port),
		"--api", "127.0.0.1:0", "--no-mdns", "--announce-interval", "1s", "--no-detect")
	w.waitOutput("joined: connected to ", 20*time.Second)
	w.waitOutput(" peers of swarm mtor\n", time.Second)
	waitWorkers(t, boot.value("api"), "demo", w.value("peer"))

	// The running node's join token, for the volunteer's next machine.
	code, stdout, stderr = mtor(t, "join-token", "--api", boot.value("api"))
	if code != 0 || strings.TrimSpace(stdout) != boot.value("join") {
		t.Fatalf("join-token: exit %d, %q (want %q), %s", code, stdout, boot.value("join"), stderr)
	}
}

// A second node on this machine cannot take a --listen port that a node
// already holds (libp2p sets SO_REUSEPORT, which would let it, and then
// the kernel splits the incoming connections between the two).
func TestE2EListenPortTaken(t *testing.T) {
	needBinary(t)
	listen := fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", freePort(t, "tcp"))
	startNode(t, "first", "--data-dir", t.TempDir(), "--listen", listen, "--api", "off", "--no-mdns", "--no-detect")
	code, stdout, stderr := mtor(t, "node", "--data-dir", t.TempDir(), "--listen", listen, "--api", "off", "--no-mdns", "--no-detect")
	if code != exitError || stdout != "" || strings.Count(stderr, "\n") != 1 ||
		!strings.Contains(stderr, "mtor node: --listen "+listen+": address already in use") ||
		!strings.Contains(stderr, "another mtor node") {
		t.Fatalf("second node: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// The demo takes other ports when its own are taken and prints the URLs in
// use; Ctrl-C on `make demo | tee log` (the reader of its output dies with
// the same signal) stops every node it started, and an answer in flight
// then ends with an error its client reads, not with a cut connection.
func TestE2EDemoPortsAndCtrlC(t *testing.T) {
	needBinary(t)
	// Hold the bridge's default port, as llama.cpp's server would.
	held, err := net.Listen("tcp", "127.0.0.1:5080")
	if err != nil {
		t.Logf("127.0.0.1:5080 is taken already: %v", err) // taken all the same
	} else {
		defer held.Close()
	}
	tmp := t.TempDir()
	cmd := exec.Command("bash", "demo.sh", e2eBin)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp, "MTOR_DEMO_API=", "MTOR_DEMO_BRIDGE=", "GOLOG_LOG_LEVEL=error")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // its own group, as in a terminal
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		for _, pid := range demoNodes(t, tmp) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})

	// Read until the demo is up, keeping what it printed.
	var out strings.Builder
	sc := bufio.NewScanner(r)
	web, ctl := "", ""
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if u, ok := strings.CutPrefix(line, "web page:"); ok {
			web = strings.TrimSpace(u)
		}
		if a, ok := strings.CutPrefix(line, "control API:"); ok {
			ctl = strings.TrimSpace(a)
		}
		if strings.HasPrefix(line, "demo: running") {
			break
		}
	}
	if web == "" || strings.Contains(web, ":5080/") {
		t.Fatalf("demo did not start on another bridge port:\n%s", out.String())
	}
	resp, err := http.Get(web)
	if err != nil {
		t.Fatalf("the web page printed is not served: %v\n%s", err, out.String())
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", web, resp.Status)
	}
	nodes := demoNodes(t, tmp)
	if len(nodes) != 3 {
		t.Fatalf("%d demo nodes running, want 3:\n%s", len(nodes), out.String())
	}
	// An answer of about 15 s (the demo's 5 ms a word), under way.
	streaming := make(chan struct{})
	answered := make(chan error, 1)
	go func() {
		var once sync.Once
		_, err := api.NewClient(ctl).Query(t.Context(), &api.QueryRequest{Model: "demo", Prompt: strings.Repeat("word ", 3000)}, func(ev *api.Event) error {
			once.Do(func() { close(streaming) })
			return nil
		})
		answered <- err
	}()
	select {
	case <-streaming:
	case err := <-answered:
		t.Fatalf("query through the demo's control API %s: %v", ctl, err)
	case <-time.After(30 * time.Second):
		t.Fatalf("no answer through the demo's control API %s within 30 s", ctl)
	}

	// Ctrl-C: tee dies and the script gets SIGINT.
	r.Close()
	if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(45 * time.Second):
		t.Fatal("demo.sh did not exit within 45 s of Ctrl-C")
	}
	// The nodes' grace (5 s) is shorter than the answer: it ends with an
	// error the client reads (UNAVAILABLE from the stopping node, or BUSY
	// from the router when the worker hands it on and every worker is
	// stopping).
	var pe *protocol.Error
	if err := <-answered; err != nil && !errors.As(err, &pe) {
		t.Errorf("the answer in flight at Ctrl-C ended with %v, not an error from the node", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(demoNodes(t, tmp)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("nodes left running after Ctrl-C: %v", demoNodes(t, tmp))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// demoNodes are the pids of the processes whose command line names dir
// (the demo's nodes have their data dirs there).
func demoNodes(t *testing.T, dir string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Skip("no /proc")
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 1 && args[1] == "node" && strings.Contains(string(b), dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}
