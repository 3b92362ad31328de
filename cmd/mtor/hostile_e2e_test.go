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

func testE2EHostileWorkerProcesses(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	br := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0")...)
	join := br.value("join")
	honest := startNode(t, "honest", tr.nodeArgs(filepath.Join(dir, "honest"), "--backend", "demo", "--join", join)...)
	waitWorkers(t, br.value("api"), "demo", honest.value("peer"))
	base := strings.TrimSuffix(br.value("bridge"), "/")

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
	}
	for _, tc := range cases {
		t.Run(tc.behaviour, func(t *testing.T) {
			liar := launchProgram(t, tc.behaviour, "peer", "error", hostileBin,
				"-join", join, "-behaviour", tc.behaviour, "-listen", tr.listen)
			liar.waitReady()
			waitWorkers(t, br.value("api"), "demo", liar.value("peer"))
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			defer cancel()
			const queries = 8
			for i := range queries {
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
			got := liar.count("query")
			t.Logf("%s: the liar was handed %d of %d queries", tc.behaviour, got, queries)
			// At least one: the bridge tried it first, or the test
			// tested nothing.
			if got < 1 || got > tc.most {
				t.Fatalf("the liar was handed %d of %d queries, want 1 to %d", got, queries, tc.most)
			}
			if code, err := liar.signal(syscall.SIGTERM); err != nil || code != 0 {
				t.Fatalf("hostile peer exit %d, %v:\n%s", code, err, liar.output())
			}
		})
	}
}
