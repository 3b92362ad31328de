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
// failed and whose batch goes again; receiptFailed, for any that failed.
const (
	receiptRetried = `"again": true`
	receiptFailed  = "returning receipts failed"
)

func testE2EReceiptsBackAfterAWorkerPause(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", boot.value("join"))...)
	// The bridge says when a receipt stream failed and its batch goes
	// again: what shows that the worker stopped before the receipts left.
	br := startNodeLogged(t, "bridge", nil, "error,mtor/receiptback=debug",
		tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0", "--join", boot.value("join"))...)
	seesRetries := receiptRetriesLogged()
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
		wantReceiptsBack(t, onHost(t), onHost(t), brAPI, brID, wAPI, wID, round*chats)
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

// nodeCLI runs a client command (`mtor ARGS`) where a node's API is
// reached: on this host, or in the node's network namespace.
type nodeCLI func(args ...string) (code int, stdout, stderr string)

// onHost runs client commands on this host.
func onHost(t *testing.T) nodeCLI {
	return func(args ...string) (int, string, string) { t.Helper(); return mtor(t, args...) }
}

// inNamespace runs client commands in the network namespace ns.
func inNamespace(t *testing.T, ns string) nodeCLI {
	return func(args ...string) (int, string, string) { t.Helper(); return mtorIn(t, ns, args...) }
}

// wantReceiptsBack waits up to 45 s for the worker's ledger to hold n
// answers served to the bridge, each countersigned once, and checks the
// bridge's ledger and both ledgers' receipts. brCLI and wCLI reach the
// bridge's API brAPI and the worker's wAPI.
func wantReceiptsBack(t *testing.T, brCLI, wCLI nodeCLI, brAPI, brID, wAPI, wID string, n int) {
	t.Helper()
	ledgerOf := func(cli nodeCLI, apiAddr string) ledger.Snapshot {
		t.Helper()
		return ledgerFrom(t)(cli("ledger", "--api", apiAddr, "--json"))
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
	for deadline := time.Now().Add(45 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		wl = ledgerOf(wCLI, wAPI)
		if of(wl, brID).ServedCountersigned == uint64(n) || time.Now().After(deadline) {
			break
		}
	}
	if e := of(wl, brID); e.ServedCountersigned != uint64(n) || e.Served.Queries != uint64(n) {
		t.Fatalf("the worker's ledger holds %d answers for the bridge, %d countersigned; want %d and %d",
			e.Served.Queries, e.ServedCountersigned, n, n)
	}
	if got := of(ledgerOf(brCLI, brAPI), wID).Consumed.Queries; got != uint64(n) {
		t.Fatalf("the bridge's ledger holds %d answers of the worker, want %d", got, n)
	}
	for _, c := range []struct {
		cli nodeCLI
		api string
	}{{brCLI, brAPI}, {wCLI, wAPI}} {
		if code, out, stderr := c.cli("ledger", "--api", c.api, "--verify"); code != 0 || !strings.Contains(out, fmt.Sprintf("recent receipts: %d verified with both signatures, 0 with the worker's only", n)) {
			t.Fatalf("ledger --verify on %s: exit %d, %s %s", c.api, code, out, stderr)
		}
	}
}

// TestE2EReceiptsBackAfterADarkLink: a worker answers three queries, and
// its link goes dark (every packet dropped both ways: no reset, no FIN)
// for 14 s before the bridge returns their countersigned receipts: past
// two receipt streams' bounds (5 s each), and long enough that either
// side may close the connection as dead. Once the link is back, each
// receipt is in the worker's ledger once, countersigned, and both ledgers
// verify: Wi-Fi that roamed, or an uplink saturated for a moment, costs
// a volunteer no credit. Before, a batch had two tries: on QUIC, whose
// reset of a stream throws away what it carried, the receipts were lost.
// On TCP and on QUIC, real processes in two network namespaces.
func TestE2EReceiptsBackAfterADarkLink(t *testing.T) {
	onEachDarkableLink(t, func(t *testing.T, n netnsPair, args netnsArgs) {
		br := startNodeLogged(t, "bridge", inNetns(n.a), "error,mtor/receiptback=debug", args("bridge", n.ipA, "--no-detect")...)
		w := startNodeIn(t, "worker", inNetns(n.b), args("worker", n.ipB, "--backend", "demo", "--join", br.value("join"))...)
		seesRetries := receiptRetriesLogged()
		tailsOnFailure(t, func() []*proc { return []*proc{br, w} })
		brAPI, wAPI, brID, wID := br.value("api"), w.value("api"), br.value("peer"), w.value("peer")
		waitPeersIn(t, n.a, brAPI, wID)

		const queries = 3
		for round := 1; ; round++ {
			askIn(t, n.a, brAPI, fmt.Sprintf("dark receipts %d", round), queries)
			before := strings.Count(br.output(), receiptFailed)
			light := darken(t, n)
			time.Sleep(14 * time.Second)
			light()
			began := time.Now()
			wantReceiptsBack(t, inNamespace(t, n.a), inNamespace(t, n.b), brAPI, brID, wAPI, wID, round*queries)
			if darkRoundDone(t, round, strings.Count(br.output(), receiptFailed)-before, seesRetries,
				fmt.Sprintf("the receipts were back %s after the link came back", time.Since(began).Round(100*time.Millisecond))) {
				return
			}
		}
	})
}

// askIn asks the node whose API is api, in namespace ns, n streamed
// queries at once, each answered whole.
func askIn(t *testing.T, ns, api, prefix string, n int) {
	t.Helper()
	results := make([]streamedQuery, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { results[i] = runStreamedQuery(t.Context(), ns, api, fmt.Sprintf("%s.%d", prefix, i)) })
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil || !strings.HasSuffix(r.text, fmt.Sprintf("%s.%d", prefix, i)) {
			t.Fatalf("query %s.%d: %q, %v", prefix, i, r.text, r.err)
		}
	}
}

// TestE2EReceiptsBackToARestartedWorker: a worker answers three queries;
// its link goes dark before their countersigned receipts come back, and
// stays dark until its ledger has written them to disk (every 5 s); then
// the process is killed (SIGKILL), the link comes back and the worker
// starts again on its data dir. The bridge's receipts wait for it and go
// to the new process, whose ledger takes what its predecessor served:
// each receipt in the worker's ledger once, countersigned, and both
// ledgers verify. A volunteer whose machine crashed keeps the credit of
// its last answers. On TCP and on QUIC, real processes in two network
// namespaces.
func TestE2EReceiptsBackToARestartedWorker(t *testing.T) {
	onEachDarkableLink(t, func(t *testing.T, n netnsPair, args netnsArgs) {
		br := startNodeLogged(t, "bridge", inNetns(n.a), "error,mtor/receiptback=debug", args("bridge", n.ipA, "--no-detect")...)
		workerArgs := args("worker", n.ipB, "--backend", "demo", "--join", br.value("join"))
		w := startNodeIn(t, "worker", inNetns(n.b), workerArgs...)
		seesRetries := receiptRetriesLogged()
		procs := []*proc{br, w}
		tailsOnFailure(t, func() []*proc { return procs })
		brAPI, brID, wID := br.value("api"), br.value("peer"), w.value("peer")
		waitPeersIn(t, n.a, brAPI, wID)

		const queries = 3
		for round := 1; ; round++ {
			askIn(t, n.a, brAPI, fmt.Sprintf("restart receipts %d", round), queries)
			before := strings.Count(br.output(), receiptFailed)
			light := darken(t, n)
			time.Sleep(7 * time.Second) // past the worker's ledger write
			if _, err := w.signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			light()
			w = startNodeIn(t, fmt.Sprintf("worker again %d", round), inNetns(n.b), workerArgs...)
			procs = append(procs, w)
			if w.value("peer") != wID {
				t.Fatal("the restarted worker has another peer ID")
			}
			began := time.Now()
			wantReceiptsBack(t, inNamespace(t, n.a), inNamespace(t, n.b), brAPI, brID, w.value("api"), wID, round*queries)
			if darkRoundDone(t, round, strings.Count(br.output(), receiptFailed)-before, seesRetries,
				fmt.Sprintf("the receipts reached the new process %s after it started", time.Since(began).Round(100*time.Millisecond))) {
				return
			}
		}
	})
}

// darkRoundDone says whether a round of a dark-link receipt test proved
// its point: its receipts came back (checked before), and failed streams
// of the bridge's (from its log, unless MTOR_E2E_LOG_LEVEL hides them:
// seesRetries) show they were still owed when the link went dark. A
// round whose receipts left just before is played again, 3 at most.
func darkRoundDone(t *testing.T, round, failed int, seesRetries bool, back string) bool {
	t.Helper()
	switch {
	case !seesRetries:
		t.Log("MTOR_E2E_LOG_LEVEL hides the bridge's receipt retries: whether the link went dark before the receipts left is not checked")
		return true
	case failed > 0:
		t.Logf("round %d: %d receipt streams failed while the link was dark; %s", round, failed, back)
		return true
	case round == 3:
		t.Fatal("in 3 rounds the receipts never left while the link was dark")
	}
	t.Logf("round %d: the receipts left before the link went dark; once more", round)
	return false
}

// receiptRetriesLogged reports whether the bridge's debug lines on
// receipt streams reach its output: MTOR_E2E_LOG_LEVEL may hide them.
func receiptRetriesLogged() bool {
	lvl := os.Getenv("MTOR_E2E_LOG_LEVEL")
	return lvl == "" || strings.Contains(lvl, "mtor/receiptback=debug")
}

// tailsOnFailure logs the end of each process's output if the test
// fails; procs is asked then, so processes started later are included.
func tailsOnFailure(t *testing.T, procs func() []*proc) {
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range procs() {
				t.Logf("%s:\n%s", p.name, p.outputTail(8000))
			}
		}
	})
}
