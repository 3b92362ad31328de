package main

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/ledger"
)

// TestE2EReceiptsBackAfterAWorkerPause: a worker process is stopped
// (SIGSTOP: its connections stay up, it reads nothing) right after it
// answered three chat completions, before the bridge returns their
// countersigned receipts, and stays stopped past a receipt stream's bound
// (5 s). Once it runs again (SIGCONT), each receipt is in its ledger
// once, countersigned, and both ledgers verify: a volunteer's laptop that
// slept a moment loses no credit and gains none twice.
func TestE2EReceiptsBackAfterAWorkerPause(t *testing.T) {
	onEachTransport(t, testE2EReceiptsBackAfterAWorkerPause)
}

func testE2EReceiptsBackAfterAWorkerPause(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", boot.value("join"))...)
	br := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0", "--join", boot.value("join"))...)
	wAPI, wID, brAPI, brID := w.value("api"), w.value("peer"), br.value("api"), br.value("peer")
	waitWorkers(t, brAPI, "demo", wID)
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range []*proc{br, w} {
				t.Logf("%s:\n%s", p.name, p.output())
			}
		}
	})

	const chats = 3
	errs := make([]error, chats)
	var wg sync.WaitGroup
	for i := range chats {
		wg.Go(func() {
			resp, err := http.Post(strings.TrimSuffix(br.value("bridge"), "/")+"/v1/chat/completions", "application/json",
				strings.NewReader(fmt.Sprintf(`{"model":"demo","messages":[{"role":"user","content":"pause %d"}]}`, i)))
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), fmt.Sprintf("pause %d", i)) {
				errs[i] = fmt.Errorf("status %d: %s", resp.StatusCode, body)
			}
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("chat completion %d: %v", i, err)
		}
	}
	// The bridge gathers receipts for half a second before returning
	// them: the worker stops before they leave.
	if err := w.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			_ = w.cmd.Process.Signal(syscall.SIGCONT)
		}
	})
	time.Sleep(7 * time.Second)
	if err := w.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true

	ledgerOf := func(apiAddr string) ledger.Snapshot {
		t.Helper()
		return ledgerFrom(t)(mtor(t, "ledger", "--api", apiAddr, "--json"))
	}
	of := func(s ledger.Snapshot, p string) (e ledger.Entry) {
		for _, e := range s.Peers {
			if e.Peer == p {
				return e
			}
		}
		return e
	}
	var wl ledger.Snapshot
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		wl = ledgerOf(wAPI)
		if of(wl, brID).ServedCountersigned == chats || time.Now().After(deadline) {
			break
		}
	}
	if e := of(wl, brID); e.ServedCountersigned != chats || e.Served.Queries != chats {
		t.Fatalf("after a 7 s pause the worker's ledger holds %d answers for the bridge, %d countersigned; want %d and %d",
			e.Served.Queries, e.ServedCountersigned, chats, chats)
	}
	if got := of(ledgerOf(brAPI), wID).Consumed.Queries; got != chats {
		t.Fatalf("the bridge's ledger holds %d answers of the worker, want %d", got, chats)
	}
	for _, a := range []string{brAPI, wAPI} {
		if code, out, stderr := mtor(t, "ledger", "--api", a, "--verify"); code != 0 || !strings.Contains(out, fmt.Sprintf("recent receipts: %d verified with both signatures, 0 with the worker's only", chats)) {
			t.Fatalf("ledger --verify on %s: exit %d, %s %s", a, code, out, stderr)
		}
	}
}
