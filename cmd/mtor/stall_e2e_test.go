package main

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// slowFirstToken is how long the fake model server takes to its first
// token: past the router's least stall bound (10 s), within its deadline.
const slowFirstToken = 15 * time.Second

// slowModelServer is a FAKE OpenAI-compatible model server (no model runs
// here) serving "demo": it answers at once while slow is false (so that
// the router measures a short first token, and a stall bound of 10 s),
// then each chat completion after slowFirstToken, as a model server
// loading its model does, sending name on got as such a chat arrives;
// served counts the chats answered at once.
func slowModelServer(t *testing.T, name string, slow *atomic.Bool, served *atomic.Int64, got chan<- string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/models" {
			io.WriteString(w, `{"object":"list","data":[{"id":"demo","object":"model"}]}`)
			return
		}
		if r.URL.Path != "/v1/chat/completions" {
			http.NotFound(w, r)
			return
		}
		if !slow.Load() {
			served.Add(1)
		} else {
			select {
			case got <- name:
			default:
			}
			select {
			case <-time.After(slowFirstToken):
			case <-r.Context().Done():
				return
			}
		}
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, `data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"slow answer from `+name+`"},"finish_reason":null}]}`+"\n\n")
		io.WriteString(w, `data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}`+"\n\ndata: [DONE]\n\n")
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestE2EStalledWorkerWhoseOnlyRivalDies: two workers, real processes,
// each in front of a model server that takes 15 s to its first token. A
// chat completion through a bridge goes to one of them; a second in, the
// other is SIGKILLed or frozen (SIGSTOP). When the router's stall bound
// (10 s) passes, it asks then whether another worker could take the
// query, and pings it: the rival does not answer, so the router waits on,
// and the slow worker's answer comes. Deciding when the attempt began
// (two workers then) ended the query UNAVAILABLE at 10 s ("1 worker made
// no progress"); trusting the rival's last announcement moved the query
// to it and ended it UNAVAILABLE at 12.8 s. On TCP and QUIC.
func TestE2EStalledWorkerWhoseOnlyRivalDies(t *testing.T) {
	needBinary(t)
	onEachTransport(t, func(t *testing.T, tr transport) {
		for name, sig := range map[string]syscall.Signal{"sigkill": syscall.SIGKILL, "sigstop": syscall.SIGSTOP} {
			t.Run(name, func(t *testing.T) { testStalledWorkerWhoseOnlyRivalDies(t, tr, sig) })
		}
	})
}

func testStalledWorkerWhoseOnlyRivalDies(t *testing.T, tr transport, sig syscall.Signal) {
	dir := t.TempDir()
	got := make(chan string, 4)
	var slow atomic.Bool
	served := map[string]*atomic.Int64{"a": {}, "b": {}}
	bridge := startNodeLogged(t, "bridge", nil, "error,mtor/router=debug", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	workers := map[string]*proc{}
	for _, name := range []string{"a", "b"} {
		url := slowModelServer(t, name, &slow, served[name], got).URL
		// Announcing at the default interval (not the tests' 1 s): a
		// frozen or killed rival then still looks available at the stall,
		// its last announcement good for 30 s.
		workers[name] = startNode(t, name, tr.nodeArgs(filepath.Join(dir, name), "--backend", "openai="+url, "--join", bridge.value("join"), "--announce-interval", "10s")...)
	}
	waitWorkers(t, bridge.value("api"), "demo", workers["a"].value("peer"), workers["b"].value("peer"))

	base := strings.TrimSuffix(bridge.value("bridge"), "/")
	// Quick answers from both first: the router's stall bound for each
	// is then its least, 10 s (with no first token measured, 30 s).
	hc := &http.Client{Timeout: 2 * time.Minute}
	for i := 0; served["a"].Load() == 0 || served["b"].Load() == 0; i++ {
		if i == 40 {
			t.Fatalf("40 quick queries reached a %d and b %d times, want both", served["a"].Load(), served["b"].Load())
		}
		if _, err := chatCompletion(t.Context(), hc, base, fmt.Sprintf("warm %d", i), false); err != nil {
			t.Fatalf("quick query %d: %v", i, err)
		}
	}
	slow.Store(true)
	type result struct {
		a   chatAnswer
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		a, err := chatCompletion(t.Context(), hc, base, "take your time", false)
		done <- result{a, err}
	}()
	var busy string
	select {
	case busy = <-got:
	case r := <-done:
		t.Fatalf("answered before any model server was asked: %+v %v", r.a, r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("no model server was asked within 30 s")
	}
	rival := map[string]string{"a": "b", "b": "a"}[busy]
	time.Sleep(time.Second)
	victim := workers[rival]
	if err := victim.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGSTOP {
		t.Cleanup(func() { _ = victim.cmd.Process.Signal(syscall.SIGCONT) })
	}
	r := <-done
	took := time.Since(start)
	if r.err != nil {
		t.Fatalf("after %s, with worker %s (%s)'s rival %s (%s) %s: %v\nbridge:\n%s", took.Round(time.Millisecond), busy, workers[busy].value("peer"), rival, victim.value("peer"), sig, r.err, bridge.outputTail(8<<10))
	}
	if want := "slow answer from " + busy; r.a.content != want || r.a.peer != workers[busy].value("peer") {
		t.Fatalf("answer %q from %s, want %q from worker %s", r.a.content, r.a.peer, want, busy)
	}
	t.Logf("worker %s answered after %s; its rival %s got %s a second in", busy, took.Round(time.Millisecond), rival, sig)
	// The rival may have been asked too, once the query waited on
	// (a frozen one before its connection is found dead): say so.
	select {
	case again := <-got:
		t.Logf("model server %s was asked too", again)
	default:
	}
}
