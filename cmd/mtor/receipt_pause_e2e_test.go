package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
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

// receiptRetried is the bridge's debug line for a receipt stream that
// failed and whose batch goes again.
const receiptRetried = `"again": true`

func testE2EReceiptsBackAfterAWorkerPause(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", boot.value("join"))...)
	// The bridge says when a receipt stream failed and its batch goes
	// again: what shows that the worker stopped before the receipts left.
	br := startNodeLogged(t, "bridge", nil, "error,mtor/receiptback=debug",
		tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0", "--join", boot.value("join"))...)
	seesRetries := os.Getenv("MTOR_E2E_LOG_LEVEL") == "" || strings.Contains(os.Getenv("MTOR_E2E_LOG_LEVEL"), "mtor/receiptback=debug")
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
	// The bridge returns receipts every half second: now and then a
	// return falls between the last answer and the SIGSTOP, and the
	// round proves nothing; another round is then played, 3 at most.
	for round := 1; ; round++ {
		askChats(t, br.value("bridge"), round, chats)
		before := strings.Count(br.output(), receiptRetried)
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
		wantReceiptsBack(t, brAPI, brID, wAPI, wID, round*chats)
		switch {
		case !seesRetries:
			t.Log("MTOR_E2E_LOG_LEVEL hides the bridge's receipt retries: whether the worker stopped before the receipts left is not checked")
			return
		case strings.Count(br.output(), receiptRetried) > before:
			t.Logf("round %d: the receipts' first stream ran out while the worker was stopped; the second brought them", round)
			return
		case round == 3:
			t.Fatal("in 3 rounds the receipts never left while the worker was stopped")
		}
		t.Logf("round %d: the receipts left before the worker stopped; once more", round)
	}
}

// askChats asks the bridge at url for n chat completions at once, each
// answered whole.
func askChats(t *testing.T, url string, round, n int) {
	t.Helper()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			prompt := fmt.Sprintf("pause %d.%d", round, i)
			resp, err := http.Post(strings.TrimSuffix(url, "/")+"/v1/chat/completions", "application/json",
				strings.NewReader(fmt.Sprintf(`{"model":"demo","messages":[{"role":"user","content":%q}]}`, prompt)))
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), prompt) {
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
}

// wantReceiptsBack waits up to 30 s for the worker's ledger to hold n
// answers served to the bridge, each countersigned once, and checks the
// bridge's ledger and both ledgers' receipts.
func wantReceiptsBack(t *testing.T, brAPI, brID, wAPI, wID string, n int) {
	t.Helper()
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
		if of(wl, brID).ServedCountersigned == uint64(n) || time.Now().After(deadline) {
			break
		}
	}
	if e := of(wl, brID); e.ServedCountersigned != uint64(n) || e.Served.Queries != uint64(n) {
		t.Fatalf("after the pause the worker's ledger holds %d answers for the bridge, %d countersigned; want %d and %d",
			e.Served.Queries, e.ServedCountersigned, n, n)
	}
	if got := of(ledgerOf(brAPI), wID).Consumed.Queries; got != uint64(n) {
		t.Fatalf("the bridge's ledger holds %d answers of the worker, want %d", got, n)
	}
	for _, a := range []string{brAPI, wAPI} {
		if code, out, stderr := mtor(t, "ledger", "--api", a, "--verify"); code != 0 || !strings.Contains(out, fmt.Sprintf("recent receipts: %d verified with both signatures, 0 with the worker's only", n)) {
			t.Fatalf("ledger --verify on %s: exit %d, %s %s", a, code, out, stderr)
		}
	}
}
