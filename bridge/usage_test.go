package bridge

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// TestUsagePerAPIKeyAndLedger: over a real swarm (a client node routes to
// a worker across libp2p), the bridge counts each API key's queries,
// tokens, time and countersigned receipts, shows each key only its own,
// and /api/swarm carries the node's ledger for the web page.
func TestUsagePerAPIKeyAndLedger(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	client := sw.Clients[0]
	r := client.Router()
	deadline := time.Now().Add(testTimeout)
	for len(r.Models()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("client node sees no model")
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, base := startBridge(t, r, WithAPIKeys([]string{"sk-alice", "sk-bob"}), WithLedger(client.Ledger()))
	ask := func(key string) {
		t.Helper()
		resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"count me"}]}`,
			map[string]string{"Authorization": "Bearer " + key})
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	}
	ask("sk-alice")
	ask("sk-alice")
	ask("sk-bob")

	usageOf := func(key string) clientUsage {
		t.Helper()
		resp, body := call(t, "GET", base+"/v1/usage", "", nil, map[string]string{"Authorization": "Bearer " + key})
		var u clientUsage
		if resp.StatusCode != 200 || json.Unmarshal(body, &u) != nil {
			t.Fatalf("usage: %d %s", resp.StatusCode, body)
		}
		return u
	}
	tests := []struct {
		key     string
		queries uint64
	}{{"sk-alice", 2}, {"sk-bob", 1}}
	for _, tc := range tests {
		u := usageOf(tc.key)
		if u.Queries != tc.queries || u.Receipts != tc.queries || u.CompletionTokens == 0 {
			t.Errorf("%s: usage %+v, want %d queries, each with a checked receipt", tc.key, u, tc.queries)
		}
	}
	if resp, _ := call(t, "GET", base+"/v1/usage", "", nil, nil); resp.StatusCode != 401 {
		t.Errorf("usage without a key: %d, want 401", resp.StatusCode)
	}

	// A bridge with keys shows its ledger only to a key holder.
	if resp, body := call(t, "GET", base+"/api/swarm", "", nil, nil); resp.StatusCode != 200 || strings.Contains(string(body), `"ledger"`) {
		t.Fatalf("swarm view without a key: %d %s", resp.StatusCode, body)
	}
	// The answers' receipts are recorded once countersigned, in the
	// batch that returns them to the worker (within half a second).
	deadline = time.Now().Add(testTimeout)
	for {
		resp, body := call(t, "GET", base+"/api/swarm", "", nil, map[string]string{"Authorization": "Bearer sk-bob"})
		var v struct {
			Peers  []router.PeerView `json:"peers"`
			Ledger *ledgerView       `json:"ledger"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(body, &v) != nil || v.Ledger == nil {
			t.Fatalf("swarm view: %d %s", resp.StatusCode, body)
		}
		if v.Ledger.Total.Consumed.Queries == 3 && len(v.Ledger.Peers) == 1 && v.Ledger.Peers[0].Peer == sw.Workers[0].ID().String() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ledger in the swarm view: %+v", v.Ledger)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestUsageBookBounded(t *testing.T) {
	b := newUsageBook(3)
	res := &router.Result{TotalMs: 5}
	for _, c := range []string{"a", "b", "c", "d", "e"} {
		b.record(c, res)
		time.Sleep(2 * time.Millisecond) // distinct last-use times
	}
	if len(b.m) != 3 || b.get("a").Queries != 0 || b.get("e").Queries != 1 {
		t.Fatalf("book holds %d clients: %v", len(b.m), b.m)
	}
}
