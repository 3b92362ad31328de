package main

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestE2EWorkerRestartedMidAnswer: the only worker of a model, a real
// process answering three streamed chat completions (a token a second),
// is SIGKILLed and started again at once on its data dir (same peer ID,
// new process), as systemd's Restart=always would. On TCP the three
// answers break at once; on QUIC the bridge's connection to the dead
// process lingers silent until its probe closes it, seconds after the new
// process announced itself. Either way every client gets its whole answer,
// continued by the new process (the bridge waits for a restarted worker
// up to 3 s; it used to give up after about 0.3 s, before the new
// process had announced itself), and the failures of the old process do
// not ban the new one (on QUIC they are recorded after its announcement:
// they used to open its breaker for 5 s).
func TestE2EWorkerRestartedMidAnswer(t *testing.T) {
	needBinary(t)
	onEachTransport(t, testWorkerRestartedMidAnswer)
}

func testWorkerRestartedMidAnswer(t *testing.T, tr transport) {
	dir := t.TempDir()
	br := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	base := strings.TrimSuffix(br.value("bridge"), "/")
	wargs := tr.nodeArgs(filepath.Join(dir, "worker"), "--backend", "demo:delay=1s", "--join", br.value("join"))
	w := startNode(t, "worker", wargs...)
	id := w.value("peer")
	waitWorkers(t, br.value("api"), "demo", id)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	const queries = 3
	type result struct {
		prompt string
		a      chatAnswer
		err    error
	}
	results := make(chan result, queries)
	for i := range queries {
		prompt := fmt.Sprintf("question %d before a crash", i)
		go func() {
			a, err := chatCompletion(ctx, http.DefaultClient, base, prompt, true)
			results <- result{prompt, a, err}
		}()
	}
	// The demo answers 8 tokens a second apart: each answer is under way.
	time.Sleep(2500 * time.Millisecond)
	if _, err := w.signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	again := startNode(t, "worker again", wargs...)
	if again.value("peer") != id {
		t.Fatal("the restarted worker has another peer ID")
	}
	for range queries {
		r := <-results
		if r.err != nil {
			t.Fatalf("%q: %v, %s after the kill\nbridge:\n%s", r.prompt, r.err, time.Since(killed).Round(time.Millisecond), br.outputTail(8<<10))
		}
		if !strings.HasPrefix(r.a.content, "[demo answer from ") || !strings.HasSuffix(r.a.content, "You said: "+r.prompt) || r.a.finish != "stop" {
			t.Fatalf("%q: answered %+v", r.prompt, r.a)
		}
		t.Logf("%q answered whole %s after the kill: %q", r.prompt, time.Since(killed).Round(time.Millisecond), r.a.content)
	}
	// Nothing of the old process's failures stands against the new one.
	peers, err := api.NewClient(br.value("api")).Peers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range peers {
		if p.Peer == id {
			found = true
			if p.Breaker != "closed" {
				t.Fatalf("the restarted worker's breaker is %s, local health %.0f", p.Breaker, p.LocalHealth)
			}
		}
	}
	if !found {
		t.Fatal("the bridge does not list the restarted worker")
	}
	prompt := "question after the crash"
	a, err := chatCompletion(ctx, http.DefaultClient, base, prompt, false)
	if err != nil || a.peer != id || !strings.HasSuffix(a.content, "You said: "+prompt) {
		t.Fatalf("after the restart: %+v %v", a, err)
	}
}
