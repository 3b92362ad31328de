package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// goMem reads the Go runtime's own view of the bridge's memory from its
// /metrics: what the heap holds, what goroutine stacks hold, and what was
// given back to the OS.
func goMem(base string) string {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	want := map[string]string{"go_memstats_heap_inuse_bytes": "heap in use", "go_memstats_stack_inuse_bytes": "stacks",
		"go_memstats_heap_released_bytes": "released", "go_goroutines": "goroutines", "mtor_bridge_connections": "ws"}
	var parts []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if label, hit := want[name]; ok && hit {
			f, _ := strconv.ParseFloat(v, 64)
			if strings.HasSuffix(name, "_bytes") {
				parts = append(parts, fmt.Sprintf("%s %.1f MiB", label, f/(1<<20)))
			} else {
				parts = append(parts, fmt.Sprintf("%s %.0f", label, f))
			}
		}
	}
	return strings.Join(parts, ", ")
}

// TestE2EOverloadMemory: a bridge process in front of two demo worker
// processes; 2 000 WebSocket clients connect, each sends one query, then
// they leave. Every query is answered or refused BUSY with a retry hint,
// /healthz stays quick, and the bridge's RSS returns to within twice its
// idle RSS. The figures are logged (docs/benchmarks.md quotes them).
func TestE2EOverloadMemory(t *testing.T) {
	needBinary(t)
	const clients = 2000
	dir := t.TempDir()
	br := startNode(t, "bridge", nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	join, api := br.value("join"), br.value("api")
	base := strings.TrimSuffix(br.value("bridge"), "/")
	w1 := startNode(t, "worker1", nodeArgs(filepath.Join(dir, "w1"), "--backend", "demo:delay=5ms", "--join", join)...)
	w2 := startNode(t, "worker2", nodeArgs(filepath.Join(dir, "w2"), "--backend", "demo:delay=5ms", "--join", join)...)
	waitWorkers(t, api, "demo", w1.value("peer"), w2.value("peer"))
	pid := br.cmd.Process.Pid

	time.Sleep(2 * time.Second) // let start-up garbage go
	idle := procStatus(t, pid, "VmRSS")
	t.Logf("idle: RSS %s (%s)", mib(idle), goMem(base))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws?format=text"
	conns := make([]*websocket.Conn, clients)
	var wg sync.WaitGroup
	dials := make(chan struct{}, 64)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dials <- struct{}{}
			defer func() { <-dials }()
			c, _, err := websocket.Dial(ctx, wsURL, nil)
			if err != nil {
				t.Errorf("dial %d: %v", i, err)
				return
			}
			c.SetReadLimit(1 << 20)
			conns[i] = c
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	time.Sleep(time.Second)
	connected := procStatus(t, pid, "VmRSS")
	t.Logf("%d connected: RSS %s, %.1f KiB a connection over idle (%s)", clients, mib(connected), float64(connected-idle)/clients/1024, goMem(base))

	// Peak RSS while the queries run, and /healthz latency as a monitor
	// in another process sees it (this one is busy with 2 000 clients).
	var peak atomic.Int64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopWatch:
				return
			case <-tick.C:
			}
			peak.Store(max(peak.Load(), procStatus(t, pid, "VmRSS")))
		}
	}()
	probe := startHealthProbe(t, base+"/healthz")

	var answered, busy, noHint atomic.Int64
	var other sync.Map // code -> count
	began := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b, _ := json.Marshal(map[string]any{"type": "submit_query", "query": map[string]any{"prompt": fmt.Sprintf("client %d", i), "query_type": "chat", "model_name": "demo"}})
			if err := c.Write(ctx, websocket.MessageText, b); err != nil {
				other.Store("write: "+err.Error(), 1)
				return
			}
			for {
				_, data, err := c.Read(ctx)
				if err != nil {
					other.Store("read: "+err.Error(), 1)
					return
				}
				var m struct {
					Type       string  `json:"type"`
					Code       string  `json:"code"`
					RetryAfter float64 `json:"retry_after"`
				}
				_ = json.Unmarshal(data, &m)
				switch {
				case m.Type == "query_done":
					answered.Add(1)
					return
				case m.Type == "error" && m.Code == "BUSY":
					busy.Add(1)
					if m.RetryAfter < 1 {
						noHint.Add(1)
					}
					return
				case m.Type == "error":
					n, _ := other.LoadOrStore(m.Code, new(atomic.Int64))
					n.(*atomic.Int64).Add(1)
					return
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(began)
	close(stopWatch)
	<-watched
	health := probe.stop()
	loaded := procStatus(t, pid, "VmRSS")
	t.Logf("%d queries in %s: %d answered, %d BUSY (%d without retry_after); peak RSS %s, RSS after %s (%s)",
		clients, took.Round(time.Millisecond), answered.Load(), busy.Load(), noHint.Load(), mib(peak.Load()), mib(loaded), goMem(base))
	t.Logf("/healthz during the queries (another process asking every 20 ms): %d asked, slowest %s, %d failed",
		health.N, time.Duration(health.WorstNs).Round(100*time.Microsecond), health.Failed)
	other.Range(func(k, v any) bool {
		t.Errorf("query ended %v (%v)", k, v)
		return true
	})
	if answered.Load()+busy.Load() != clients || noHint.Load() != 0 {
		t.Errorf("%d answered + %d busy of %d; %d BUSY without a retry hint", answered.Load(), busy.Load(), clients, noHint.Load())
	}
	// The goal is < 50 ms, logged above; the bound only catches a bridge
	// that stops answering.
	if health.N == 0 || health.Failed != 0 || health.WorstNs > int64(5*time.Second) {
		t.Errorf("/healthz: %d asked, slowest %s, %d failed", health.N, time.Duration(health.WorstNs), health.Failed)
	}

	for _, c := range conns {
		c.Close(websocket.StatusNormalClosure, "bye")
	}
	left := time.Now()
	var after int64
	for {
		time.Sleep(time.Second)
		after = procStatus(t, pid, "VmRSS")
		if after <= 2*idle || time.Since(left) > 30*time.Second {
			break
		}
	}
	t.Logf("after the clients left: RSS %s after %s, %.2f× idle (%s)", mib(after), time.Since(left).Round(time.Second), float64(after)/float64(idle), goMem(base))
	if after > 2*idle {
		t.Errorf("RSS %s 30 s after the clients left, idle was %s", mib(after), mib(idle))
	}
}

// healthReport is what the health probe process measured.
type healthReport struct {
	N       int   `json:"n"`
	Failed  int   `json:"failed"`
	WorstNs int64 `json:"worst_ns"`
}

// healthProbe is the test binary run as TestHelperHealthProbe: a monitor
// in a process of its own, so that its figures are the bridge's, not
// this busy test process's scheduling.
type healthProbe struct {
	t     *testing.T
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   bytes.Buffer
}

func startHealthProbe(t *testing.T, url string) *healthProbe {
	t.Helper()
	p := &healthProbe{t: t, cmd: exec.Command(os.Args[0], "-test.run=^TestHelperHealthProbe$", "-test.short")}
	p.cmd.Env = append(os.Environ(), "MTOR_TEST_PROBE="+url)
	p.cmd.Stdout = &p.out
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	return p
}

// stop ends the probe (it stops when its stdin closes) and reads its report.
func (p *healthProbe) stop() healthReport {
	p.t.Helper()
	_ = p.stdin.Close()
	if err := p.cmd.Wait(); err != nil {
		p.t.Fatalf("health probe: %v: %s", err, p.out.String())
	}
	var r healthReport
	if err := json.Unmarshal(p.out.Bytes(), &r); err != nil {
		p.t.Fatalf("health probe report %q: %v", p.out.String(), err)
	}
	return r
}

// TestHelperHealthProbe is not a test: run with MTOR_TEST_PROBE=URL it
// asks URL every 20 ms until its stdin closes, then prints a healthReport.
func TestHelperHealthProbe(t *testing.T) {
	u := os.Getenv("MTOR_TEST_PROBE")
	if u == "" {
		t.Skip("helper for the overload test")
	}
	done := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(done) }()
	hc := &http.Client{Timeout: 10 * time.Second}
	var r healthReport
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			_ = json.NewEncoder(os.Stdout).Encode(r)
			os.Exit(0)
		case <-tick.C:
		}
		start := time.Now()
		resp, err := hc.Get(u)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		r.N++
		if err != nil || resp.StatusCode != http.StatusOK {
			r.Failed++
		}
		r.WorstNs = max(r.WorstNs, int64(time.Since(start)))
	}
}
