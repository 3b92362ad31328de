package main

import (
	"encoding/json"
	"path/filepath"
	"slices"
	"testing"

	"github.com/mtor-swarm/mtor/node/api"
)

// Nodes without the swarm view (issue 12): pure workers follow no other
// worker; a bridge learns a model's workers on its first query (DHT
// provider records, then the model's announce topic) and only that
// model's; a node with the swarm view (the bootstrap) still lists all.
func TestE2EWithoutSwarmView(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	join := boot.value("join")
	pure := []string{"--swarm-view=false", "--join", join}
	w1 := startNode(t, "worker1", nodeArgs(filepath.Join(dir, "w1"), append([]string{"--backend", "demo:model=alpha"}, pure...)...)...)
	w2 := startNode(t, "worker2", nodeArgs(filepath.Join(dir, "w2"), append([]string{"--backend", "demo:model=alpha"}, pure...)...)...)
	w3 := startNode(t, "worker3", nodeArgs(filepath.Join(dir, "w3"), append([]string{"--backend", "demo:model=beta"}, pure...)...)...)
	waitWorkers(t, boot.value("api"), "alpha", w1.value("peer"), w2.value("peer"))
	waitWorkers(t, boot.value("api"), "beta", w3.value("peer"))

	bridge := startNode(t, "bridge", nodeArgs(filepath.Join(dir, "bridge"), append([]string{"--no-detect"}, pure...)...)...)
	others := func(apiAddr, self string) []string {
		t.Helper()
		peers, err := api.NewClient(apiAddr).Peers(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, p := range peers {
			if p.Peer != self {
				out = append(out, p.Peer)
			}
		}
		slices.Sort(out)
		return out
	}
	for _, n := range []*proc{w1, w3, bridge} {
		if got := others(n.value("api"), n.value("peer")); len(got) != 0 {
			t.Errorf("node %s without the swarm view, before any query, lists %v", n.value("peer"), got)
		}
	}

	code, stdout, stderr := mtor(t, "query", "--api", bridge.value("api"), "--model", "alpha", "--json", "first query")
	if code != 0 {
		t.Fatalf("first query through a bridge without the swarm view: exit %d: %s", code, stderr)
	}
	var out queryOutput
	if err := json.Unmarshal([]byte(stdout), &out); err != nil {
		t.Fatalf("%v: %q", err, stdout)
	}
	if out.Peer != w1.value("peer") && out.Peer != w2.value("peer") {
		t.Fatalf("answered by %q, not a worker of alpha", out.Peer)
	}
	waitWorkers(t, bridge.value("api"), "alpha", w1.value("peer"), w2.value("peer"))
	if got := others(bridge.value("api"), bridge.value("peer")); slices.Contains(got, w3.value("peer")) {
		t.Errorf("the bridge follows beta's worker though it never routed to beta: %v", got)
	}
	for _, w := range []*proc{w1, w2, w3} {
		if got := others(w.value("api"), w.value("peer")); len(got) != 0 {
			t.Errorf("pure worker %s lists %v", w.value("peer"), got)
		}
	}
}
