package main

import (
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestE2EOpenPacingFlags: --open-pacing and --open-queue reach the
// router. The one worker is frozen (SIGSTOP), so a first query holds the
// turn to open a stream to it while it waits for an Accepted that never
// comes. A second query then waits its turn under the defaults, but with
// --open-pacing 1 --open-queue 0 it has no turn and no place in the
// queue, and is refused BUSY at once. On TCP and on QUIC.
func TestE2EOpenPacingFlags(t *testing.T) { onEachTransport(t, testE2EOpenPacingFlags) }

func testE2EOpenPacingFlags(t *testing.T, tr transport) {
	needBinary(t)
	// The pacer's refusal is BUSY; the frozen worker's own failure, which
	// a waiting query shares, is UNAVAILABLE.
	const full = "BUSY:"
	for _, tc := range []struct {
		name     string
		flags    []string
		wantFull bool
	}{
		{"defaults", nil, false},
		{"one open no queue", []string{"--open-pacing", "1", "--open-queue", "0"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), append([]string{"--no-detect"}, tc.flags...)...)...)
			wk := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", boot.value("join"))...)
			waitWorkers(t, boot.value("api"), "demo", wk.value("peer"))
			if err := wk.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = wk.cmd.Process.Signal(syscall.SIGCONT) })

			first := make(chan string, 1)
			go func() {
				_, _, stderr := mtor(t, "query", "--api", boot.value("api"), "--model", "demo", "--timeout", "20s", "first")
				first <- stderr
			}()
			// The first query takes the turn as soon as it is routed (its
			// in-flight count rises just before) and keeps it for the
			// Accepted bound (2.5 s).
			waitInFlight(t, boot.value("api"), wk.value("peer"))
			code, _, stderr := mtor(t, "query", "--api", boot.value("api"), "--model", "demo", "--timeout", "20s", "second")
			if code == 0 {
				t.Fatalf("second query answered by a frozen worker")
			}
			if got := strings.Contains(stderr, full); got != tc.wantFull {
				t.Errorf("second query's error %q: contains %q = %v, want %v", strings.TrimSpace(stderr), full, got, tc.wantFull)
			}
			if s := <-first; strings.Contains(s, full) {
				t.Errorf("first query refused by the pacer: %s", s)
			}
			t.Logf("second query: %s", strings.TrimSpace(stderr))
		})
	}
}

// waitInFlight waits until the node behind apiAddr has a query open to
// worker.
func waitInFlight(t *testing.T, apiAddr, worker string) {
	t.Helper()
	waitPeer(t, apiAddr, 20*time.Second, "a query in flight to "+worker, func(p api.Peer) bool {
		return p.Peer == worker && p.LocalInFlight > 0
	})
}

// waitPeer polls the peer view of the node behind apiAddr until a row
// satisfies ok, for at most within, and returns that row.
func waitPeer(t *testing.T, apiAddr string, within time.Duration, what string, ok func(api.Peer) bool) api.Peer {
	t.Helper()
	c := api.NewClient(apiAddr)
	deadline := time.Now().Add(within)
	for {
		peers, err := c.Peers(t.Context())
		for _, p := range peers {
			if ok(p) {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s after %s (last: %+v, %v)", what, within, peers, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
