package main

import (
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// TestE2ELedger: real mtor processes. A query's countersigned receipt
// verifies (both signatures), both nodes' ledgers record the answer (the
// worker's with the countersigned receipt returned to it),
// `mtor ledger` shows it (table and --json), and the ledger survives the
// node in its data dir.
func TestE2ELedger(t *testing.T) { onEachTransport(t, testE2ELedger) }

func testE2ELedger(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	bootDir := filepath.Join(dir, "boot")
	boot := startNode(t, "bootstrap", tr.nodeArgs(bootDir, "--no-detect")...)
	bootAPI, bootID := boot.value("api"), boot.value("peer")
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", boot.value("join"))...)
	wAPI, wID := w.value("api"), w.value("peer")
	waitWorkers(t, bootAPI, "demo", wID)

	code, stdout, stderr := mtor(t, "query", "--api", bootAPI, "--json", "--model", "demo", "count my tokens")
	out := queryAnswer(t, "query", code, stdout, stderr)
	var rc pb.Receipt
	if err := proto.Unmarshal(out.Receipt, &rc); err != nil || len(out.Receipt) == 0 {
		t.Fatalf("query --json has no receipt (%v): %s", err, stdout)
	}
	if err := receipt.Verify(&rc); err != nil {
		t.Fatalf("the receipt does not verify: %v", err)
	}
	if got := peer.ID(rc.GetWorker()).String(); got != wID || out.Peer != wID {
		t.Fatalf("receipt worker %s, answered by %s, want %s", got, out.Peer, wID)
	}
	if got := peer.ID(rc.GetRequester()).String(); got != bootID {
		t.Fatalf("receipt requester %s, want the routing node %s", got, bootID)
	}
	if rc.GetCompletionTokens() != out.Usage.CompletionTokens || rc.GetCompletionTokens() == 0 {
		t.Fatalf("receipt says %d tokens, the answer %d", rc.GetCompletionTokens(), out.Usage.CompletionTokens)
	}

	ledgerOf := func(apiAddr string) ledger.Snapshot {
		t.Helper()
		return ledgerFrom(t)(mtor(t, "ledger", "--api", apiAddr, "--json"))
	}
	tokens := uint64(rc.GetPromptTokens() + rc.GetCompletionTokens())
	bl := ledgerOf(bootAPI)
	if len(bl.Peers) != 1 || bl.Peers[0].Peer != wID || bl.Peers[0].Consumed.Queries != 1 ||
		bl.Peers[0].Consumed.PromptTokens+bl.Peers[0].Consumed.CompletionTokens != tokens ||
		bl.Peers[0].Balance != int64(rc.GetTotalMs()) {
		t.Fatalf("routing node's ledger: %+v", bl)
	}
	// The ledger's copy of the receipt is the countersigned one.
	var kept pb.Receipt
	if len(bl.Recent) != 1 || proto.Unmarshal(bl.Recent[0].Receipt, &kept) != nil || receipt.Verify(&kept) != nil {
		t.Fatalf("routing node's recent receipts do not verify: %+v", bl.Recent)
	}
	// The worker's ledger records the answer, and the routing node's
	// countersignature comes back to it within moments.
	var wl ledger.Snapshot
	deadline := time.Now().Add(30 * time.Second)
	for {
		wl = ledgerOf(wAPI)
		if len(wl.Peers) == 1 && wl.Peers[0].ServedCountersigned == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(wl.Peers) != 1 || wl.Peers[0].Peer != bootID || wl.Peers[0].Served.Queries != 1 ||
		wl.Total.Served.CompletionTokens != uint64(rc.GetCompletionTokens()) || wl.Peers[0].ServedCountersigned != 1 {
		t.Fatalf("worker's ledger: %+v", wl)
	}
	var served pb.Receipt
	if len(wl.Recent) != 1 || proto.Unmarshal(wl.Recent[0].Receipt, &served) != nil || receipt.Verify(&served) != nil ||
		!proto.Equal(&served, &rc) {
		t.Fatalf("worker's copy of the receipt is not the countersigned one: %+v", wl.Recent)
	}

	code, table, stderr := mtor(t, "ledger", "--api", bootAPI)
	if code != 0 || !strings.Contains(table, wID) || !strings.Contains(table, "1q ") || !strings.HasPrefix(table, "PEER") {
		t.Fatalf("ledger table: exit %d, %s %s", code, table, stderr)
	}
	// --verify checks the receipts in the CLI, not trusting the node.
	for _, a := range []string{bootAPI, wAPI} {
		code, out, stderr := mtor(t, "ledger", "--api", a, "--verify")
		if code != 0 || !strings.Contains(out, "recent receipts: 1 verified with both signatures, 0 with the worker's only") {
			t.Fatalf("ledger --verify on %s: exit %d, %s %s", a, code, out, stderr)
		}
	}

	// Chat completions through a bridge (the OpenAI-compatible API shows
	// no receipt): the routing node countersigns their receipts in one
	// batch as it returns them, and both ledgers hold them verified.
	br := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0", "--join", boot.value("join"))...)
	brAPI, brID := br.value("api"), br.value("peer")
	waitWorkers(t, brAPI, "demo", wID)
	const chats = 3
	for range chats {
		resp, err := http.Post(strings.TrimSuffix(br.value("bridge"), "/")+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"count these too"}]}`))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("chat completion: %d", resp.StatusCode)
		}
	}
	confirmed := func(s ledger.Snapshot, p string) uint64 {
		for _, e := range s.Peers {
			if e.Peer == p {
				return e.ServedCountersigned
			}
		}
		return 0
	}
	deadline = time.Now().Add(30 * time.Second)
	for confirmed(ledgerOf(wAPI), brID) != chats || ledgerOf(brAPI).Total.Consumed.Queries != chats {
		if time.Now().After(deadline) {
			t.Fatalf("after %d chat completions: worker's ledger %+v, bridge's %+v", chats, ledgerOf(wAPI), ledgerOf(brAPI))
		}
		time.Sleep(100 * time.Millisecond)
	}
	found := 0
	for _, rc := range ledgerOf(wAPI).Recent {
		var r pb.Receipt
		if proto.Unmarshal(rc.Receipt, &r) != nil || peer.ID(r.GetRequester()).String() != brID {
			continue
		}
		if err := receipt.Verify(&r); err != nil || r.GetRouterBatch() == nil {
			t.Fatalf("a receipt of a chat completion at the worker: %v, batch %v", err, r.GetRouterBatch())
		}
		found++
	}
	if found != chats {
		t.Fatalf("%d receipts of chat completions at the worker, want %d", found, chats)
	}
	for _, a := range []string{brAPI, wAPI} {
		if code, out, stderr := mtor(t, "ledger", "--api", a, "--verify"); code != 0 || !strings.Contains(out, "0 with the worker's only") {
			t.Fatalf("ledger --verify on %s: exit %d, %s %s", a, code, out, stderr)
		}
	}

	// Stopped, the node leaves its ledger in the data dir.
	if code := boot.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("bootstrap exit %d", code)
	}
	id, err := peer.Decode(bootID)
	if err != nil {
		t.Fatal(err)
	}
	kept2, err := ledger.Open(bootDir, id)
	if err != nil {
		t.Fatal(err)
	}
	if got := kept2.Snapshot().Total.Consumed.Queries; got != 1 {
		t.Fatalf("ledger.json in the data dir holds %d consumed queries, want 1", got)
	}
}
