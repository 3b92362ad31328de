package main

import (
	"bytes"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
)

// A bridge without the swarm view lists, in /v1/models, the models of
// workers it never routed to (from the catalogue of the view node it
// joined), marked as such, and a query for one of them is answered. On
// TCP and on QUIC.
func TestE2ECatalogBridge(t *testing.T) {
	needBinary(t)
	onEachTransport(t, testCatalogBridge)
}

func testCatalogBridge(t *testing.T, tr transport) {
	dir := t.TempDir()
	boot := startNode(t, "bootstrap", tr.nodeArgs(filepath.Join(dir, "boot"), "--no-detect")...)
	pure := []string{"--swarm-view=false", "--join", boot.value("join")}
	for _, w := range []struct{ name, model string }{{"worker1", "alpha"}, {"worker2", "beta"}} {
		startNode(t, w.name, tr.nodeArgs(filepath.Join(dir, w.name), append([]string{"--backend", "demo:model=" + w.model}, pure...)...)...)
	}
	bridge := startNode(t, "bridge", tr.nodeArgs(filepath.Join(dir, "bridge"), append([]string{"--no-detect", "--bridge", "127.0.0.1:0"}, pure...)...)...)
	base := strings.TrimSuffix(bridge.value("bridge"), "/")
	// The same bridge with the catalogue off reads and lists none.
	off := startNode(t, "bridge-off", tr.nodeArgs(filepath.Join(dir, "bridge-off"), append([]string{"--no-detect", "--bridge", "127.0.0.1:0", "--catalog-every", "0"}, pure...)...)...)
	offBase := strings.TrimSuffix(off.value("bridge"), "/")

	type model struct {
		ID   string `json:"id"`
		Mtor struct {
			Peers   int  `json:"peers"`
			Catalog bool `json:"catalog"`
		} `json:"mtor"`
	}
	modelsOf := func(base string) map[string]model {
		t.Helper()
		resp, err := http.Get(base + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var list struct {
			Data []model `json:"data"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
			t.Fatal(err)
		}
		out := map[string]model{}
		for _, m := range list.Data {
			out[m.ID] = m
		}
		return out
	}
	models := func() map[string]model { return modelsOf(base) }
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	for {
		ms := models()
		if ms["alpha"].Mtor.Catalog && ms["beta"].Mtor.Catalog {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/v1/models of a bridge without the swarm view after 90 s: %+v", ms)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("the bridge listed both models %s after it started", time.Since(start).Round(100*time.Millisecond))
	if ms := modelsOf(offBase); len(ms) != 0 {
		t.Fatalf("/v1/models of a bridge with --catalog-every 0 lists %+v, want nothing (it routed to nothing yet)", ms)
	}

	body := []byte(`{"model":"beta","messages":[{"role":"user","content":"hello from the catalogue"}]}`)
	resp, err := http.Post(base+"/v1/chat/completions", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("query for a model known from the catalogue: %d %s", resp.StatusCode, b)
	}
	var answer struct {
		Model   string `json:"model"`
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(b, &answer); err != nil || len(answer.Choices) == 0 || answer.Choices[0].Message.Content == "" {
		t.Fatalf("answer %s (%v)", b, err)
	}
	// Routed to now, beta is followed: listed from the table, no longer
	// from the catalogue; alpha still from the catalogue.
	deadline = time.Now().Add(30 * time.Second)
	for {
		ms := models()
		if m := ms["beta"]; !m.Mtor.Catalog && m.Mtor.Peers == 1 && ms["alpha"].Mtor.Catalog {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after routing to beta, /v1/models: %+v", ms)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := slices.Sorted(maps.Keys(models())); !slices.Equal(got, []string{"alpha", "beta"}) {
		t.Fatalf("/v1/models lists %v", got)
	}
}

// Only a pure worker (models, no bridge, no verifier) leaves the model
// catalogue unread: nobody asks it for a model list.
func TestCatalogReaderDefault(t *testing.T) {
	worker := []backend.Backend{demo.New("demo")}
	for _, tc := range []struct {
		name     string
		args     []string
		backends []backend.Backend
		read     bool
	}{
		{"pure worker", nil, worker, false},
		{"pure worker without the view", []string{"--swarm-view=false"}, worker, false},
		{"worker with a bridge", []string{"--bridge", "127.0.0.1:0", "--swarm-view=false"}, worker, true},
		{"worker that verifies", []string{"--verify"}, worker, true},
		{"bridge without models", []string{"--no-detect", "--bridge", "127.0.0.1:0", "--swarm-view=false"}, nil, true},
		{"router watching a model", []string{"--no-detect", "--watch", "llama3"}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}
			f, _, err := parseNodeFlags(e, append([]string{"--data-dir", t.TempDir()}, tc.args...))
			if err != nil {
				t.Fatal(err)
			}
			if got := !f.pureWorker(tc.backends); got != tc.read {
				t.Errorf("mtor node %q serving %d backends: reads the catalogue %v, want %v", tc.args, len(tc.backends), got, tc.read)
			}
		})
	}
}
