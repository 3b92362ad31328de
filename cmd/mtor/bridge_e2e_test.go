package main

// End-to-end tests of the bridge's defences: a real `mtor node --bridge`
// process facing a DNS rebinding page, oversized requests and an endless
// answer, its peak memory read from /proc.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/mtor-swarm/mtor/node/api"
)

// Memory bounds of a bridge node (worker and bridge in one process), as
// docs/benchmarks.md records them. VmHWM is the process's peak resident
// memory since it started.
const (
	// maxHWMOversized bounds the peak while 30 clients send 15 MiB bodies
	// at once; before the in-flight byte budget it was 1.31 GB.
	maxHWMOversized = 300 << 20
	// maxHWMEndless bounds the peak while a worker streams an endless
	// answer to a non-streaming request.
	maxHWMEndless = 200 << 20
)

// procStatus reads a "kB" field (VmRSS, VmHWM) of /proc/PID/status, in
// bytes.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc here: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			t.Fatalf("%s: %q: %v", field, v, err)
		}
		return kb << 10
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// oversizedBodies are two chat requests of size bytes that the bridge must
// read whole before it can refuse them: one image (a data: URL over the
// media limit) and one text (over the swarm's request frame).
func oversizedBodies(size int) [][]byte {
	img := []byte(`{"model":"demo","messages":[{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,`)
	img = append(img, bytes.Repeat([]byte("QUFB"), (size-len(img)-8)/4)...)
	img = append(img, `"}}]}]}`...)
	txt := []byte(`{"model":"demo","messages":[{"role":"user","content":"`)
	txt = append(txt, bytes.Repeat([]byte("a"), size-len(txt)-4)...)
	txt = append(txt, `"}]}`...)
	return [][]byte{img, txt}
}

// errorCode is the code of an OpenAI-shaped error body, or "".
func errorCode(b []byte) string {
	var e struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	_ = json.Unmarshal(b, &e)
	return e.Error.Code
}

// TestE2EOversizedBodiesKeepBridgeSmall: 30 clients send 15 MiB chat
// bodies to one bridge at once, as in issue 13. A body that does not fit
// in the bridge's budget of body bytes is refused at once with 429 and
// Retry-After; its client tries again until the bridge has read its body
// and refused it with 413. All 30 bodies are read in the end, and the
// node's peak memory stays under maxHWMOversized.
func TestE2EOversizedBodiesKeepBridgeSmall(t *testing.T) {
	needBinary(t)
	n := startNode(t, "bridge", nodeArgs(filepath.Join(t.TempDir(), "n"), "--backend", "demo", "--bridge", "127.0.0.1:0")...)
	base := strings.TrimSuffix(n.value("bridge"), "/")
	pid := n.cmd.Process.Pid
	idle := procStatus(t, pid, "VmRSS")

	const clients, size = 30, 15 << 20
	bodies := oversizedBodies(size)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	var (
		mu       sync.Mutex
		outcomes = map[string]int{} // final answers
		busy     int                // 429s on the way
		wg       sync.WaitGroup
	)
	hc := &http.Client{Transport: &http.Transport{MaxConnsPerHost: clients}}
	send := func(body []byte) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(body))
		if err != nil {
			return 0, "", err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
			return 0, "", fmt.Errorf("429 without Retry-After: %s", b)
		}
		return resp.StatusCode, errorCode(b), nil
	}
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outcome := ""
			for {
				status, code, err := send(bodies[i%2])
				if err != nil {
					outcome = err.Error()
					break
				}
				if status != http.StatusTooManyRequests {
					outcome = fmt.Sprintf("%d %s", status, code)
					break
				}
				mu.Lock()
				busy++
				mu.Unlock()
				// A client's back-off, shorter than Retry-After to keep
				// the test quick; the bridge must hold whatever comes.
				select {
				case <-time.After(50 * time.Millisecond):
				case <-ctx.Done():
				}
			}
			mu.Lock()
			outcomes[outcome]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	hwm := procStatus(t, pid, "VmHWM")
	t.Logf("%d × %s bodies: %v, after %d × 429 bridge_busy; bridge RSS idle %s, peak (VmHWM) %s", clients, mib(size), outcomes, busy, mib(idle), mib(hwm))
	if outcomes["413 request_too_large"] != clients {
		t.Errorf("outcomes %v, want all %d 413 request_too_large", outcomes, clients)
	}
	if hwm > maxHWMOversized {
		t.Errorf("bridge peak memory %s, over the bound of %s", mib(hwm), mib(maxHWMOversized))
	}
	// The bridge still serves once the burst is over.
	status, code, err := send([]byte(`{"model":"demo","messages":[{"role":"user","content":"still there?"}]}`))
	if err != nil || status != http.StatusOK {
		t.Fatalf("after the burst: %d %s %v", status, code, err)
	}
}

// endlessModelServer is a fake OpenAI-compatible model server (no real
// model can be made to talk forever) serving one chat model, "endless",
// whose streamed answer never ends: 1 KiB chunks until the client goes
// away. ended receives once per request when the server saw its client
// (the worker) hang up.
func endlessModelServer(t *testing.T) (url string, ended <-chan struct{}) {
	t.Helper()
	done := make(chan struct{}, 16)
	chunk := fmt.Sprintf("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":%q},\"finish_reason\":null}]}\n\n", strings.Repeat("endless ", 128))
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"list","data":[{"id":"endless","object":"model","owned_by":"test"}]}`)
	})
	mux.HandleFunc("POST /v1/chat/completions", func(w http.ResponseWriter, r *http.Request) {
		defer func() { done <- struct{}{} }()
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := 0; ; i++ {
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
			if i%16 == 0 {
				if err := rc.Flush(); err != nil {
					return
				}
			}
			if r.Context().Err() != nil {
				return
			}
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL, done
}

// TestE2EEndlessAnswerIsBounded: a worker whose model server streams
// forever answers a non-streaming chat. The bridge stops gathering at its
// answer limit, tells the client 502 response_too_large (the answer, not
// the request, was too large), the model server's call is cancelled, and
// the node's peak memory stays under maxHWMEndless.
func TestE2EEndlessAnswerIsBounded(t *testing.T) {
	needBinary(t)
	url, ended := endlessModelServer(t)
	n := startNode(t, "bridge", nodeArgs(filepath.Join(t.TempDir(), "n"), "--backend", "openai="+url, "--bridge", "127.0.0.1:0")...)
	base := strings.TrimSuffix(n.value("bridge"), "/")
	pid := n.cmd.Process.Pid
	idle := procStatus(t, pid, "VmRSS")

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	post := func() (int, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions",
			strings.NewReader(`{"model":"endless","messages":[{"role":"user","content":"talk forever"}]}`))
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}
	// As many at once as the worker runs (--max-concurrency, 4).
	const clients = 4
	start := time.Now()
	var wg sync.WaitGroup
	answers := make([]string, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body, err := post()
			answers[i] = fmt.Sprintf("%d %s %v", status, bytes.TrimSpace(body), err)
			if err != nil || status != http.StatusBadGateway || errorCode(body) != "response_too_large" {
				t.Errorf("endless answer: %s, want 502 response_too_large", answers[i])
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	for range clients {
		select {
		case <-ended:
		case <-ctx.Done():
			t.Fatal("a model server's call was never cancelled")
		}
	}
	hwm := procStatus(t, pid, "VmHWM")
	t.Logf("%d endless answers refused in %s: %s; bridge RSS idle %s, peak (VmHWM) %s", clients, took.Round(time.Millisecond), answers[0], mib(idle), mib(hwm))
	if hwm > maxHWMEndless {
		t.Errorf("bridge peak memory %s, over the bound of %s", mib(hwm), mib(maxHWMEndless))
	}
}

// TestE2EBridgeHostGuard: a keyless bridge refuses a DNS rebinding page
// (Host and Origin its own name, evil.example) with 403 host_not_allowed
// on chat, /api/swarm, /ws and the page, and serves its loopback address
// and the --bridge-host name.
func TestE2EBridgeHostGuard(t *testing.T) {
	needBinary(t)
	n := startNode(t, "bridge", nodeArgs(filepath.Join(t.TempDir(), "n"), "--backend", "demo", "--bridge", "127.0.0.1:0", "--bridge-host", "gpu.example")...)
	base := strings.TrimSuffix(n.value("bridge"), "/")
	port := base[strings.LastIndex(base, ":")+1:]
	for _, tc := range []struct {
		host string
		want int
	}{
		{"evil.example:" + port, http.StatusForbidden},
		{"127.0.0.1:" + port, http.StatusOK},
		{"gpu.example:" + port, http.StatusOK},
	} {
		for _, path := range []string{"/v1/chat/completions", "/api/swarm", "/"} {
			method, body := http.MethodGet, ""
			if strings.HasPrefix(path, "/v1/") {
				method, body = http.MethodPost, `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`
			}
			req, err := http.NewRequestWithContext(t.Context(), method, base+path, strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			req.Host = tc.host
			req.Header.Set("Origin", "http://"+tc.host)
			if body != "" {
				req.Header.Set("Content-Type", "application/json")
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.want || (tc.want == http.StatusForbidden && errorCode(b) != "host_not_allowed") {
				t.Errorf("%s %s, Host %s: %d %s, want %d", method, path, tc.host, resp.StatusCode, bytes.TrimSpace(b), tc.want)
			}
		}
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws",
			&websocket.DialOptions{Host: tc.host, HTTPHeader: http.Header{"Origin": {"http://" + tc.host}}})
		cancel()
		switch {
		case tc.want == http.StatusOK && err != nil:
			t.Errorf("/ws, Host %s: %v", tc.host, err)
		case tc.want != http.StatusOK && (err == nil || resp == nil || resp.StatusCode != tc.want):
			t.Errorf("/ws, Host %s: %v %v, want %d", tc.host, resp, err, tc.want)
		}
		if err == nil {
			c.Close(websocket.StatusNormalClosure, "")
		}
	}
}

// TestE2EBridgeStopPastItsGrace: a bridge node stopped with SIGTERM while
// a stream from a slow worker outlasts its --grace ends the stream with
// the bridge's error (bridge_stopping) as its last event, cancels the
// query at the worker, and exits 0. The client, still connected, reads
// why its answer stopped instead of a cut connection. On TCP and on QUIC,
// whose streams end differently.
func TestE2EBridgeStopPastItsGrace(t *testing.T) {
	onEachTransport(t, testE2EBridgeStopPastItsGrace)
}

func testE2EBridgeStopPastItsGrace(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	// 200 words at 100 ms each: 20 s, far past the bridge's grace.
	w := startNode(t, "slow-worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo:delay=100ms,model=slow",
		"--join", boot.value("join"))...)
	br := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "b"), "--no-detect", "--bridge", "127.0.0.1:0", "--grace", "1s",
		"--join", boot.value("join"))...)
	waitWorkers(t, br.value("api"), "slow", w.value("peer"))
	base := strings.TrimSuffix(br.value("bridge"), "/")

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	body := `{"model":"slow","stream":true,"messages":[{"role":"user","content":"` + strings.TrimSpace(strings.Repeat("word ", 200)) + `"}]}`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	rd := bufio.NewReader(resp.Body)
	if line, err := rd.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: {") {
		t.Fatalf("first line %q, %v: want a chunk", line, err)
	}
	type exit struct {
		code int
		err  error
	}
	stopped := make(chan exit, 1)
	go func() {
		code, err := br.signal(syscall.SIGTERM)
		stopped <- exit{code, err}
	}()
	rest, _ := io.ReadAll(rd)
	var last string
	for l := range strings.Lines(string(rest)) {
		if d, ok := strings.CutPrefix(l, "data: "); ok {
			last = strings.TrimSpace(d)
		}
	}
	if code := errorCode([]byte(last)); code != "bridge_stopping" {
		t.Errorf("the stream's last event %q, want the error bridge_stopping", last)
	}
	if x := <-stopped; x.err != nil || x.code != 0 {
		t.Errorf("bridge exit %d (%v):\n%s", x.code, x.err, br.output())
	}
	// The worker's query was cancelled: it serves nothing now.
	wc := api.NewClient(w.value("api"))
	deadline := time.Now().Add(30 * time.Second)
	for {
		peers, err := wc.Peers(ctx)
		busy := -1
		for _, p := range peers {
			if p.Self {
				busy = int(p.InFlight)
			}
		}
		if err == nil && busy == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker still runs the cut query (in flight %d, %v):\n%s", busy, err, w.output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
