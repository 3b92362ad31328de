package main

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestE2ELargePromptToAFrozenWorkerMoves: queries whose prompts (2 MiB)
// are larger than a stream's window, sent through a bridge while one of
// the two workers is frozen (SIGSTOP, a real process), are all answered by
// the live one: the write to the frozen worker, which never reads, is
// bounded (by the worker's own 10 s for a request), not left until the
// connection is found dead or the query's 120 s deadline. On TCP and on
// QUIC.
func TestE2ELargePromptToAFrozenWorkerMoves(t *testing.T) {
	needBinary(t)
	onEachTransport(t, testE2ELargePromptToAFrozenWorkerMoves)
}

func testE2ELargePromptToAFrozenWorkerMoves(t *testing.T, tr transport) {
	dir := t.TempDir()
	bridge := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	join := []string{"--backend", "demo:delay=0", "--join", bridge.value("join")}
	live := startNode(t, "live", tr.nodeArgs(filepath.Join(dir, "live"), join...)...)
	victim := startNode(t, "victim", tr.nodeArgs(filepath.Join(dir, "victim"), join...)...)
	waitWorkers(t, bridge.value("api"), "demo", live.value("peer"), victim.value("peer"))
	if err := victim.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = victim.cmd.Process.Signal(syscall.SIGCONT) })

	const queries = 8
	base := strings.TrimSuffix(bridge.value("bridge"), "/")
	client := &http.Client{Timeout: 60 * time.Second} // half the query's deadline
	type answer struct {
		peer, text string
		took       time.Duration
		err        error
	}
	answers := make([]answer, queries)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range queries {
		wg.Go(func() {
			prompt := fmt.Sprintf("q%d %s", i, strings.Repeat("x", 2<<20))
			text, peer, err := askOpenAI(t.Context(), client, base, prompt, false)
			answers[i] = answer{peer: peer, text: text, took: time.Since(start), err: err}
		})
	}
	// Some of them go to the frozen worker first: the test is about them.
	waitPeer(t, bridge.value("api"), 30*time.Second, "a query in flight to the frozen worker", func(p api.Peer) bool {
		return p.Peer == victim.value("peer") && p.LocalInFlight > 0
	})
	wg.Wait()
	var slowest time.Duration
	for i, a := range answers {
		if a.err != nil {
			t.Fatalf("query %d after %s: %.300v", i, a.took.Round(time.Millisecond), a.err)
		}
		if a.peer != live.value("peer") {
			t.Errorf("query %d answered by %q, want the live worker %s", i, a.peer, live.value("peer"))
		}
		if !strings.Contains(a.text, fmt.Sprintf("q%d x", i)) {
			t.Errorf("query %d: answer does not echo its prompt: %.200q", i, a.text)
		}
		slowest = max(slowest, a.took)
	}
	t.Logf("%d queries of 2 MiB, one worker frozen: all answered by the live one, the last after %s", queries, slowest.Round(time.Millisecond))
	// Without the send bound a query on the frozen worker waited until
	// the worker's connection was found dead (here about 30 s on QUIC, 40
	// s on TCP); with it, about 10 s. The rest is slack for a loaded
	// machine.
	if slowest > 20*time.Second {
		t.Errorf("the last query took %s: its send to the frozen worker should have given up after about 10 s", slowest.Round(time.Millisecond))
	}
}
