package main

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/ledger"
)

// TestE2EPreferContributors: real mtor processes. A worker started with
// --prefer-contributors and one slot has consumed work from one node (the
// contributor) and served another (the consumer). While its slot is
// taken, the consumer's query arrives first and the contributor's second;
// the contributor's is answered first.
func TestE2EPreferContributors(t *testing.T) { onEachTransport(t, testE2EPreferContributors) }

func testE2EPreferContributors(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	join := boot.value("join")
	// The worker and the contributor route queries of their own too: they
	// keep the swarm view that pure workers go without by default.
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo:delay=50ms,model=slow",
		"--max-concurrency", "1", "--prefer-contributors", "--swarm-view", "--join", join)...)
	c := startNode(t, "contributor", tr.nodeArgs(filepath.Join(dir, "c"), "--backend", "demo:delay=20ms,model=fast", "--swarm-view", "--join", join)...)
	x := startNode(t, "consumer", tr.nodeArgs(filepath.Join(dir, "x"), "--no-detect", "--join", join)...)
	wAPI, cAPI, xAPI := w.value("api"), c.value("api"), x.value("api")
	waitWorkers(t, wAPI, "fast", c.value("peer"))
	waitWorkers(t, xAPI, "slow", w.value("peer"))
	waitWorkers(t, cAPI, "slow", w.value("peer"))

	// The balances, made by real queries: the worker consumes from the
	// contributor and serves the consumer.
	for _, q := range [][]string{{wAPI, "fast", "work for the worker"}, {xAPI, "slow", "work for the consumer"}} {
		if code, _, stderr := mtor(t, "query", "--api", q[0], "--model", q[1], q[2]); code != 0 {
			t.Fatalf("query through %s: exit %d: %s", q[0], code, stderr)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, stdout, _ := mtor(t, "ledger", "--api", wAPI, "--json")
		var s ledger.Snapshot
		if code == 0 && json.Unmarshal([]byte(stdout), &s) == nil && balance(s, c.value("peer")) > 0 && balance(s, x.value("peer")) < 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker's ledger lacks the balances: %s", stdout)
		}
		time.Sleep(100 * time.Millisecond)
	}

	type end struct {
		who string
		err error
		out string
	}
	ends := make(chan end, 3)
	ask := func(who, api, prompt string) {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			out, err := exec.CommandContext(ctx, e2eBin, "query", "--api", api, "--model", "slow", prompt).CombinedOutput()
			ends <- end{who, err, string(out)}
		}()
	}
	// 80 words at 50 ms: the slot is taken for about 4 s; the two queued
	// queries arrive a second apart within it.
	ask("blocker", xAPI, strings.Repeat("word ", 80))
	time.Sleep(time.Second)
	ask("consumer", xAPI, "consumer asks")
	time.Sleep(time.Second)
	ask("contributor", cAPI, "contributor asks")
	var order []string
	for range 3 {
		e := <-ends
		if e.err != nil {
			t.Fatalf("%s's query: %v: %s", e.who, e.err, e.out)
		}
		order = append(order, e.who)
	}
	if got, want := strings.Join(order, ","), "blocker,contributor,consumer"; got != want {
		t.Fatalf("answered in order %s, want %s", got, want)
	}
}

func balance(s ledger.Snapshot, p string) int64 {
	for _, e := range s.Peers {
		if e.Peer == p {
			return e.Balance
		}
	}
	return 0
}
