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
)

// TestE2EHostileWorkerProcesses: a bridge and an honest demo worker,
// real `mtor node` processes, and beside them, one at a time, a lying
// worker process (internal/hostilepeer) that announces "demo" with
// perfect health and a 1 ms first token, so that the bridge tries it
// first. Each lie costs the bridge's clients nothing but time: every
// chat completion, streamed or whole, gets the honest worker's answer
// (or, for invented figures, the liar's text with figures the bridge
// saw, not the liar's), no tool call or image the query never asked for
// reaches a client, and the liar is soon out of rotation. On TCP and on
// QUIC.
func TestE2EHostileWorkerProcesses(t *testing.T) { onEachTransport(t, testE2EHostileWorkerProcesses) }

// bridgeAndHonestWorker starts a bridge node and an honest demo worker
// joined to it, and returns the bridge, its join address and its
// OpenAI-compatible API's base URL.
func bridgeAndHonestWorker(t *testing.T, tr transport) (br *proc, join, base string) {
	t.Helper()
	needBinary(t)
	dir := t.TempDir()
	br = startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	join = br.value("join")
	honest := startNode(t, "honest", tr.nodeArgs(filepath.Join(dir, "honest"), "--backend", "demo", "--join", join)...)
	waitWorkers(t, br.value("api"), "demo", honest.value("peer"))
	return br, join, strings.TrimSuffix(br.value("bridge"), "/")
}

func testE2EHostileWorkerProcesses(t *testing.T, tr transport) {
	br, join, base := bridgeAndHonestWorker(t, tr)

	cases := []struct {
		behaviour string
		// most queries the liar may be handed: a stall or an empty
		// answer takes three to open its breaker, a protocol violation
		// one.
		most int
		// whether the liar's own text may reach a client: an answer
		// whose only lie is its figures is still an answer.
		liarAnswers bool
	}{
		{"fake-queue", 4, false},
		{"empty-chunks", 4, false},
		{"tool-call", 2, false},
		{"media-to-chat", 2, false},
		{"invented-figures", 2, true},
		{"empty-answer", 3, false},
		// Moved from after 3 stall periods (30 s), not blamed, then
		// ranked after the honest worker (a slow queue): one query.
		{"queue-within", 1, false},
		// Its clock ahead: a TIMEOUT at once, long before the
		// deadline, counts against its model like a failing backend.
		{"early-timeout", 3, false},
	}
	for _, tc := range cases {
		t.Run(tc.behaviour, func(t *testing.T) {
			liar := launchProgram(t, tc.behaviour, "peer", "error", hostileBin,
				"-join", join, "-behaviour", tc.behaviour, "-listen", tr.listen)
			liar.waitReady()
			waitWorkers(t, br.value("api"), "demo", liar.value("peer"))
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
			defer cancel()
			ask := func(i int) {
				t.Helper()
				prompt := fmt.Sprintf("question %d about %s", i, tc.behaviour)
				a, err := chatCompletion(ctx, http.DefaultClient, base, prompt, i%2 == 0)
				if err != nil {
					t.Fatalf("query %d: %v", i, err)
				}
				if a.toolCalls != 0 || a.finish != "stop" {
					t.Fatalf("query %d: %d tool calls, finish %q: %+v", i, a.toolCalls, a.finish, a)
				}
				honestText := strings.HasPrefix(a.content, "[demo answer from ") && strings.HasSuffix(a.content, "You said: "+prompt)
				if !honestText && (!tc.liarAnswers || a.content != "hostile answer ") {
					t.Fatalf("query %d answered %q", i, a.content)
				}
				if a.promptTokens > 1000 || a.completionTokens > 1000 {
					t.Fatalf("query %d: the client was handed usage %d + %d tokens", i, a.promptTokens, a.completionTokens)
				}
			}
			// The bridge draws at random between two workers that
			// neither is clearly better than (protocol.ClearlyBetter):
			// on a loaded machine the honest worker's measured speed
			// can be that close to the liar's claim. So the count
			// starts with the liar's first query, not the bridge's: ask
			// until the liar has been handed one (1 in 2^32 to take
			// all 32), then 8 more. A query's arrival is counted when
			// the liar's output line is read, which may trail its
			// answer: one more query asked here may reach the liar
			// too, and counts against most like any other.
			const queries = 8
			const tries = 32
			i := 0
			for ; liar.count("query") == 0; i++ {
				if i == tries {
					t.Fatalf("the liar was handed none of %d queries: the bridge never tried it", i)
				}
				ask(i)
			}
			drawn := i
			for ; i < drawn+queries; i++ {
				ask(i)
			}
			got := liar.count("query")
			t.Logf("%s: the liar was handed %d of %d queries, the first of them within the first %d", tc.behaviour, got, i, drawn)
			if got > tc.most {
				t.Fatalf("the liar was handed %d of %d queries (the first within the first %d), want at most %d", got, i, drawn, tc.most)
			}
			if code, err := liar.signal(syscall.SIGTERM); err != nil || code != 0 {
				t.Fatalf("hostile peer exit %d, %v:\n%s", code, err, liar.output())
			}
		})
	}
}

// TestE2EHostileFreshStartClaims: a worker process that breaks the
// protocol (a tool call no query offered: its breaker opens at once) and
// claims a fresh start in each announcement, one a second, while it keeps
// its connection to the bridge: a restart (a new incarnation), or a move
// (new addresses). Either would clear its breaker; the bridge has the
// connection the old process held probed, the same process answers, and
// its failures stand. Beside a real bridge and an honest worker, on TCP
// and QUIC: 20 chat completions half a second apart, all answered by the
// honest worker; the liar is handed the first and the one trial its
// breaker allows after 5 s: 2 (7 to 9 when every claim cleared its
// breaker).
func TestE2EHostileFreshStartClaims(t *testing.T) {
	onEachTransport(t, func(t *testing.T, tr transport) {
		for _, claim := range []string{"-restarts", "-moves"} {
			t.Run(claim[1:], func(t *testing.T) { testE2EHostileFreshStartClaims(t, tr, claim) })
		}
	})
}

func testE2EHostileFreshStartClaims(t *testing.T, tr transport, claim string) {
	br, join, base := bridgeAndHonestWorker(t, tr)
	liar := launchProgram(t, claim[1:], "peer", "error", hostileBin,
		"-join", join, "-behaviour", "tool-call", claim, "-listen", tr.listen)
	liar.waitReady()
	waitWorkers(t, br.value("api"), "demo", liar.value("peer"))
	// Its connection must be older than the margin by which the bridge
	// tells the old process's connections from a new one's (5 s before
	// the announcement before the claim).
	time.Sleep(7 * time.Second)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const queries = 20
	for i := range queries {
		prompt := fmt.Sprintf("question %d for a liar claiming fresh starts", i)
		a, err := chatCompletion(ctx, http.DefaultClient, base, prompt, i%2 == 0)
		if err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
		if a.toolCalls != 0 || a.finish != "stop" || !strings.HasSuffix(a.content, "You said: "+prompt) {
			t.Fatalf("query %d: %+v", i, a)
		}
		time.Sleep(500 * time.Millisecond)
	}
	got := liar.count("query")
	t.Logf("a liar claiming a fresh start (%s) every second was handed %d of %d queries over %d s", claim, got, queries, queries/2)
	if got < 1 || got > 3 {
		t.Fatalf("the liar was handed %d of %d queries, want 1 to 3", got, queries)
	}
	if code, err := liar.signal(syscall.SIGTERM); err != nil || code != 0 {
		t.Fatalf("hostile peer exit %d, %v:\n%s", code, err, liar.output())
	}
}
