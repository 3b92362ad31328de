package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// liarServer is a hostile test backend: an OpenAI-compatible server that
// lists the model "demo" and answers every chat at once with random
// text. An mtor worker in front of it announces "demo" like the honest
// demo workers do.
func liarServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/models":
			io.WriteString(w, `{"object":"list","data":[{"id":"demo","object":"model"}]}`)
		case "/v1/chat/completions":
			noise := make([]byte, 8)
			_, _ = rand.Read(noise)
			w.Header().Set("Content-Type", "text/event-stream")
			for _, word := range []string{"Certainly! ", "Here ", "is ", hex.EncodeToString(noise)} {
				fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":%q},\"finish_reason\":null}]}\n\n", word)
			}
			io.WriteString(w, "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestE2EVerifierDistrustsLiar: three demo worker processes and one whose
// backend is a liar, all announcing "demo"; a verifier process (--verify,
// no traffic of its own) spot-checks them. The liar shows as distrusted
// in `mtor peers` (JSON and table), the honest workers keep reputation
// 100, and the verifier routes no query to the liar.
func TestE2EVerifierDistrustsLiar(t *testing.T) { onEachTransport(t, testE2EVerifierDistrustsLiar) }

func testE2EVerifierDistrustsLiar(t *testing.T, tr transport) {
	needBinary(t)
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	join := boot.value("join")
	var honest []string
	for i := 0; i < 3; i++ {
		w := startNode(t, fmt.Sprintf("worker%d", i), tr.nodeArgs(filepath.Join(dir, fmt.Sprintf("w%d", i)), "--backend", "demo", "--join", join)...)
		honest = append(honest, w.value("peer"))
	}
	liarW := startNode(t, "liar", tr.nodeArgs(filepath.Join(dir, "liar"), "--backend", "openai="+liarServer(t).URL, "--join", join)...)
	liar := liarW.value("peer")
	verifier := startNode(t, "verifier", tr.nodeArgs(filepath.Join(dir, "verifier"), "--no-detect", "--join", join,
		"--verify", "--canary-interval", "200ms", "--canary-rate", "0")...)
	vapi := verifier.value("api")
	waitWorkers(t, vapi, "demo", append(honest, liar)...)

	deadline := time.Now().Add(2 * time.Minute)
	var peers []api.Peer
	for {
		code, stdout, stderr := mtor(t, "peers", "--api", vapi, "--json")
		if code != 0 {
			t.Fatalf("mtor peers --json: exit %d: %s", code, stderr)
		}
		peers = nil
		if err := json.Unmarshal([]byte(stdout), &peers); err != nil {
			t.Fatal(err)
		}
		if distrusted(peers, liar) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("liar %s not distrusted by the verifier after 2 min: %s\n%s", liar, stdout, verifier.output())
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range peers {
		for _, h := range honest {
			if p.Peer == h && (p.Distrusted || p.Reputation != 100) {
				t.Fatalf("honest worker %s: reputation %v distrusted %v", h, p.Reputation, p.Distrusted)
			}
		}
	}
	code, stdout, stderr := mtor(t, "peers", "--api", vapi)
	if code != 0 || !strings.Contains(stdout, "REP") || !strings.Contains(stdout, "(distrusted)") {
		t.Fatalf("mtor peers: exit %d, want a REP column marking the liar distrusted:\n%s%s", code, stdout, stderr)
	}
	for i := 0; i < 8; i++ {
		code, stdout, stderr := mtor(t, "query", "--api", vapi, "--model", "demo", "--timeout", "30s", "--json", fmt.Sprintf("question %d", i))
		if code != 0 {
			t.Fatalf("query %d: exit %d: %s", i, code, stderr)
		}
		var out struct{ Peer string }
		if err := json.Unmarshal([]byte(stdout), &out); err != nil {
			t.Fatal(err)
		}
		if out.Peer == liar {
			t.Fatalf("query %d routed to the distrusted liar", i)
		}
	}
}

func distrusted(peers []api.Peer, id string) bool {
	for _, p := range peers {
		if p.Peer == id {
			return p.Distrusted
		}
	}
	return false
}
