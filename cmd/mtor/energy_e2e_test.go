package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestE2EEnergyPreferenceMeasuresNewcomers: real processes, each worker's
// GPU a fake NVML (fakeNVML) drawing a different constant power, so that
// the whole path runs: NVML's energy counter, the worker's meter and
// joules per token, its announcement, the bridge's swarm view and its
// router preferring energy, per query: the OpenAI API's X-Mtor-Prefer
// header, then `mtor query --prefer energy` through the node's control
// API and with a temporary node of its own (--join); the bridge node
// itself ranks by latency. A 400 W worker is measured
// first; a 40 W one, four times slower to its first token (80 ms against
// 20), joins. The
// next query preferring energy goes to the newcomer, which has a GPU and
// no figure yet (the probe), and once both figures are in the view every
// such query goes to the frugal one. Without the probe the measured
// worker would take every query and the newcomer never be measured. The
// newcomer is within the bridge's --energy-slack of 10 (given without
// --prefer-energy: it is the slack of the queries that ask for energy)
// but not within the default 1.5.
func TestE2EEnergyPreferenceMeasuresNewcomers(t *testing.T) {
	onEachTransport(t, testE2EEnergyPreferenceMeasuresNewcomers)
}

func testE2EEnergyPreferenceMeasuresNewcomers(t *testing.T, tr transport) {
	needBinary(t)
	lib := fakeNVML(t)
	dir := t.TempDir()
	bridge := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"),
		"--bridge", "127.0.0.1:0", "--energy-slack", "10")...)
	base := strings.TrimSuffix(bridge.value("bridge"), "/")
	apiAddr := bridge.value("api")
	gpuWorker := func(name string, watts int, first string) *proc {
		p := startNodeIn(t, name, []string{"env", "LD_LIBRARY_PATH=" + lib, "FAKE_GPU_WATTS=" + strconv.Itoa(watts)},
			tr.nodeArgs(filepath.Join(dir, name), "--backend", "demo:delay=10ms,first="+first, "--join", bridge.value("join"))...)
		if g := p.value("gpu"); !strings.Contains(g, "FAKE GPU for tests") {
			t.Fatalf("worker %s sees no fake GPU: gpu: %s", name, g)
		}
		waitWorkers(t, apiAddr, "demo", p.value("peer"))
		return p
	}
	ask := func() string {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, base+"/v1/chat/completions",
			strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"which of you is frugal?"}]}`))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Mtor-Prefer", "energy")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("chat: %d %s %v", resp.StatusCode, body, err)
		}
		var out struct {
			Mtor struct {
				Peer     string `json:"peer"`
				EnergyMJ uint64 `json:"energy_mj"`
			} `json:"mtor"`
		}
		if err := json.Unmarshal(body, &out); err != nil {
			t.Fatalf("chat answer %s: %v", body, err)
		}
		if out.Mtor.EnergyMJ == 0 {
			t.Errorf("answer of %s measured no energy: %s", out.Mtor.Peer, body)
		}
		return out.Mtor.Peer
	}
	// joules waits until the bridge's swarm view shows w's joules per
	// token for demo, with its GPU.
	joules := func(w *proc) float32 {
		t.Helper()
		p := waitPeer(t, apiAddr, 30*time.Second, w.name+"'s joules per token", func(p api.Peer) bool {
			return p.Peer == w.value("peer") && len(p.GPUs) > 0 && p.GPUs[0].Name == "FAKE GPU for tests" && demoJoules(p) > 0
		})
		return demoJoules(p)
	}

	hot := gpuWorker("hot", 400, "20ms")
	for i := range 3 {
		if p := ask(); p != hot.value("peer") {
			t.Fatalf("query %d went to %s, the only worker is %s", i, p, hot.value("peer"))
		}
	}
	jHot := joules(hot)

	cool := gpuWorker("cool", 40, "80ms")
	if p := ask(); p != cool.value("peer") {
		t.Fatalf("the first query after the 40 W worker joined went to %s, not to it (%s) to measure it", p, cool.value("peer"))
	}
	jCool := joules(cool)
	if jCool >= jHot {
		t.Fatalf("40 W worker at %v J/token, 400 W one at %v: want less", jCool, jHot)
	}
	var got []string
	for range 5 {
		got = append(got, ask())
	}
	for i, p := range got {
		if p != cool.value("peer") {
			t.Fatalf("query %d of 5 went to %s, not to the frugal worker %s (%v J/token against %v): %v",
				i, p, cool.value("peer"), jCool, jHot, got)
		}
	}
	// Through the node's control API, and through a temporary node of the
	// CLI's own (--join), whose router knows the workers only from their
	// announcements and takes the default slack (1.5). It asks as soon as
	// it has admitted one worker of the model, which may be either: with
	// both, the frugal one is too slow for its slack and the fast one
	// answers; with the frugal one alone, that one. So of the temporary
	// node only an answer by one of the two is asserted.
	for i, via := range [][]string{{"--api", apiAddr}, {"--api", apiAddr}, {"--join", bridge.value("join")}} {
		args := append(append([]string{"query"}, via...), "--prefer", "energy", "--json", "which of you is frugal?")
		code, stdout, stderr := mtor(t, args...)
		var out struct {
			Peer string `json:"peer"`
		}
		if code != 0 || json.Unmarshal([]byte(stdout), &out) != nil {
			t.Fatalf("mtor query --prefer energy: exit %d: %s %s", code, stdout, stderr)
		}
		if via[0] == "--join" {
			if out.Peer != hot.value("peer") && out.Peer != cool.value("peer") {
				t.Fatalf("mtor query %v --prefer energy (%d) answered by %s, neither worker", via, i, out.Peer)
			}
			continue
		}
		if out.Peer != cool.value("peer") {
			t.Fatalf("mtor query %v --prefer energy (%d) went to %s, not to the frugal worker %s", via, i, out.Peer, cool.value("peer"))
		}
	}
	t.Logf("%s", fmt.Sprintf("joules per token in the bridge's view: 400 W worker %.3f, 40 W worker %.3f", jHot, jCool))
}

// demoJoules is the joules per token a peer row announces for demo, 0
// when none.
func demoJoules(p api.Peer) float32 {
	for _, m := range p.Models {
		if m.Name == "demo" {
			return m.JoulesPerToken
		}
	}
	return 0
}
