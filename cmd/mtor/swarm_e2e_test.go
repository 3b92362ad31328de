package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// listsPeer reports whether the node behind apiAddr has peer in its table.
func listsPeer(t *testing.T, apiAddr, peer string) bool {
	t.Helper()
	peers, err := api.NewClient(apiAddr).Peers(t.Context())
	if err != nil {
		t.Fatalf("peers of %s: %v", apiAddr, err)
	}
	for _, p := range peers {
		if p.Peer == peer {
			return true
		}
	}
	return false
}

// A closed swarm run with real mtor processes: `mtor swarm init`, the
// owner's node, a worker joining with an open invite, a client with an
// invite for its peer ID; an outsider that knows the swarm's name and
// the owner's address is not seen, nor is the second holder of a used
// one-time invite (which is told why); `mtor revoke --peer` and `mtor
// revoke --invite` cut a member off within 5 s; an expired invite stops
// `mtor node` with a clear message.
func TestE2EClosedSwarm(t *testing.T) { onEachTransport(t, testE2EClosedSwarm) }

func testE2EClosedSwarm(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	ownerDir := filepath.Join(dir, "owner")
	code, out, stderr := mtor(t, "swarm", "init", "--swarm", "team", "--data-dir", ownerDir)
	if code != 0 || !strings.Contains(out, "owner: 12D3Koo") {
		t.Fatalf("swarm init: exit %d\n%s%s", code, out, stderr)
	}
	if code, _, stderr := mtor(t, "swarm", "init", "--swarm", "team", "--data-dir", ownerDir); code != 1 || !strings.Contains(stderr, "already belongs to a closed swarm") {
		t.Errorf("second swarm init: exit %d, %s", code, stderr)
	}
	owner := startNode(t, "owner", tr.nodeArgs(ownerDir, "--no-detect")...)
	if m := owner.value("membership"); !strings.Contains(m, "closed swarm") {
		t.Errorf("owner membership line: %q", m)
	}
	ownerAPI := owner.value("api")

	code, token, stderr := mtor(t, "invite", "--data-dir", ownerDir, "--api", ownerAPI, "--expires", "1h")
	if code != 0 {
		t.Fatalf("invite: exit %d: %s", code, stderr)
	}
	token = strings.TrimSpace(token)
	worker := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "w"), "--backend", "demo", "--join", token)...)
	wpeer := worker.value("peer")
	waitWorkers(t, ownerAPI, "demo", wpeer)

	cDir := filepath.Join(dir, "c")
	_, cid, _ := mtor(t, "id", "--data-dir", cDir)
	code, ctoken, stderr := mtor(t, "invite", "--data-dir", ownerDir, "--api", ownerAPI, "--peer", strings.TrimSpace(cid), "--roles", "client")
	if code != 0 {
		t.Fatalf("invite --peer: exit %d: %s", code, stderr)
	}
	client := startNode(t, "client", tr.nodeArgs(cDir, "--no-detect", "--join", strings.TrimSpace(ctoken))...)
	clientAPI := client.value("api")
	waitWorkers(t, clientAPI, "demo", wpeer)
	if code, out, stderr := mtor(t, "query", "--api", clientAPI, "--model", "demo", "hello"); code != 0 || out == "" {
		t.Fatalf("member query: exit %d: %s%s", code, out, stderr)
	}

	// The same open invite a second time: the owner refuses it.
	again := startNode(t, "again", tr.nodeArgs(filepath.Join(dir, "again"), "--backend", "demo", "--join", token)...)
	outsider := startNode(t, "outsider", tr.nodeArgs(filepath.Join(dir, "out"), "--backend", "demo", "--swarm", "team", "--join", owner.value("join"))...)
	for start := time.Now(); !strings.Contains(again.output(), "already used by another peer"); {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("the second holder of a one-time invite was not told why it was refused:\n%s", again.output())
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(3 * time.Second)
	for _, stranger := range []*proc{again, outsider} {
		for _, api := range []string{ownerAPI, clientAPI} {
			if listsPeer(t, api, stranger.value("peer")) {
				t.Errorf("%s lists the non-member %s", api, stranger.name)
			}
		}
	}

	code, _, stderr = mtor(t, "revoke", "--data-dir", ownerDir, "--peer", wpeer)
	if code != 0 {
		t.Fatalf("revoke: exit %d: %s", code, stderr)
	}
	start := time.Now()
	for listsPeer(t, ownerAPI, wpeer) || listsPeer(t, clientAPI, wpeer) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("the revoked worker is still listed 5 s after mtor revoke")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("revoked worker gone from the owner's and the client's tables %s after mtor revoke", time.Since(start).Round(time.Millisecond))
	time.Sleep(1500 * time.Millisecond) // the owner's node has read the file again since
	if b, err := os.ReadFile(filepath.Join(ownerDir, "revocations")); err != nil || strings.Count(string(b), "\n") != 1 {
		t.Errorf("the owner's revocations file should hold the one revocation once: %q, %v", b, err)
	}

	// Revoking an open invite cuts off the member that redeemed it.
	code, token2, stderr := mtor(t, "invite", "--data-dir", ownerDir, "--api", ownerAPI)
	if code != 0 {
		t.Fatalf("invite: exit %d: %s", code, stderr)
	}
	token2 = strings.TrimSpace(token2)
	w2 := startNode(t, "worker2", tr.nodeArgs(filepath.Join(dir, "w2"), "--backend", "demo", "--join", token2)...)
	waitWorkers(t, clientAPI, "demo", w2.value("peer"))
	if code, _, stderr := mtor(t, "revoke", "--data-dir", ownerDir, "--invite", token2); code != 0 {
		t.Fatalf("revoke --invite: exit %d: %s", code, stderr)
	}
	start = time.Now()
	for listsPeer(t, ownerAPI, w2.value("peer")) || listsPeer(t, clientAPI, w2.value("peer")) {
		if time.Since(start) > 5*time.Second {
			t.Fatalf("the member of a revoked invite is still listed 5 s after mtor revoke --invite")
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("member of the revoked invite gone %s after mtor revoke --invite", time.Since(start).Round(time.Millisecond))

	code, short, stderr := mtor(t, "invite", "--data-dir", ownerDir, "--api", ownerAPI, "--expires", "1s")
	if code != 0 {
		t.Fatalf("invite --expires 1s: exit %d: %s", code, stderr)
	}
	time.Sleep(7 * time.Second) // past the expiry and the 5 s of clock skew allowed
	code, _, stderr = mtor(t, append([]string{"node"}, tr.nodeArgs(filepath.Join(dir, "late"), "--no-detect", "--join", strings.TrimSpace(short))...)...)
	if code != 1 || !strings.Contains(stderr, "invite expired at") || !strings.Contains(stderr, "mtor invite") {
		t.Errorf("expired invite: exit %d, stderr %q", code, stderr)
	}
	t.Logf("expired invite: %s", strings.TrimSpace(stderr))
}
