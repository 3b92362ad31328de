package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/mtor-swarm/mtor/node/api"
)

// Nodes without the swarm view (issue 12): pure workers follow no other
// worker; a bridge learns a model's workers on its first query (DHT
// provider records, then the model's announce topic) and only that
// model's; a node with the swarm view (the bootstrap) still lists all.
// Then the worker that answered is killed (SIGKILL: no goodbye on the
// topic) and a new worker of the model starts: the bridge routes around
// the dead one and learns the new one from the model's topic alone. On TCP
// and on QUIC, where a killed peer's connection vanishes without a reset.
func TestE2EWithoutSwarmView(t *testing.T) {
	needBinary(t)
	onEachTransport(t, testWithoutSwarmView)
}

func testWithoutSwarmView(t *testing.T, tr transport) {
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	join := boot.value("join")
	pure := []string{"--swarm-view=false", "--join", join}
	// Workers run on the defaults, as a volunteer starts one: a pure
	// worker goes without the swarm view unless asked.
	worker := func(name, model string) *proc {
		return startNode(t, name, tr.nodeArgs(filepath.Join(dir, name), "--backend", "demo:model="+model, "--join", join)...)
	}
	w1 := worker("worker1", "alpha")
	w2 := worker("worker2", "alpha")
	w3 := worker("worker3", "beta")
	waitWorkers(t, boot.value("api"), "alpha", w1.value("peer"), w2.value("peer"))
	waitWorkers(t, boot.value("api"), "beta", w3.value("peer"))

	bridge := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), append([]string{"--no-detect"}, pure...)...)...)
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

	query := func(prompt string) queryOutput {
		t.Helper()
		code, stdout, stderr := mtor(t, "query", "--api", bridge.value("api"), "--model", "alpha", "--json", prompt)
		return queryAnswer(t, fmt.Sprintf("%s through a bridge without the swarm view", prompt), code, stdout, stderr)
	}
	out := query("first query")
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

	// SIGKILL the worker that answered: every later query is answered,
	// by the other one.
	victim, survivor := w1, w2
	if out.Peer == w2.value("peer") {
		victim, survivor = w2, w1
	}
	_ = victim.cmd.Process.Signal(syscall.SIGKILL)
	for i := range 5 {
		if got := query(fmt.Sprintf("after the kill %d", i)); got.Peer != survivor.value("peer") {
			t.Errorf("query %d after SIGKILL of %s answered by %q, want the survivor %s", i, victim.value("peer"), got.Peer, survivor.value("peer"))
		}
	}

	// A worker of alpha started now is learnt from alpha's topic (or its
	// provider record) without the swarm view, and takes queries.
	w4 := worker("worker4", "alpha")
	waitWorkers(t, bridge.value("api"), "alpha", survivor.value("peer"), w4.value("peer"))
	survivor.stop(syscall.SIGTERM)
	if got := query("after the survivor left"); got.Peer != w4.value("peer") {
		t.Errorf("answered by %q once the first workers are gone, want the new worker %s", got.Peer, w4.value("peer"))
	}
}

// A bridge without the swarm view, then a worker, and a query as soon as
// the worker has started: the worker's provider record is put as soon as its DHT
// has a peer (not at its next heartbeat, 10 s by default), and the
// bridge's first look-up, which may come before the record, is tried
// again while the model's topic is new to it. On TCP and on QUIC.
func TestE2EFirstQueryRightAfterStart(t *testing.T) {
	needBinary(t)
	onEachTransport(t, func(t *testing.T, tr transport) {
		dir := t.TempDir()
		args := func(name string, extra ...string) []string {
			// The default heartbeat: a provide that failed at start
			// would wait for it.
			return append([]string{"--data-dir", filepath.Join(dir, name), "--listen", tr.listen, "--api", "127.0.0.1:0", "--no-mdns"}, extra...)
		}
		boot := startNode(t, "bootstrap", args("boot", "--no-detect")...)
		join := boot.value("join")
		bridge := startNode(t, "bridge", args("bridge", "--no-detect", "--swarm-view=false", "--join", join)...)
		w := startNode(t, "worker", args("worker", "--backend", "demo:model=fresh", "--join", join)...)
		code, stdout, stderr := mtor(t, "query", "--api", bridge.value("api"), "--model", "fresh", "--json", "first words")
		out := queryAnswer(t, "first query right after start", code, stdout, stderr)
		if out.Peer != w.value("peer") {
			t.Fatalf("answered by %q, want the worker %s", out.Peer, w.value("peer"))
		}
	})
}
