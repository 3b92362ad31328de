package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
)

// The swarm view's default: a pure worker (serves models, no bridge, not
// a verifier) does not follow the whole swarm; every other node does; the
// flag, on the command line or in a config file, always wins.
func TestSwarmViewDefault(t *testing.T) {
	worker := []backend.Backend{demo.New("demo")}
	cfg := filepath.Join(t.TempDir(), "node.toml")
	if err := os.WriteFile(cfg, []byte("swarm-view = true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		args     []string
		backends []backend.Backend
		want     bool
	}{
		{"pure worker", nil, worker, false},
		{"worker with a bridge", []string{"--bridge", "127.0.0.1:0"}, worker, true},
		{"worker that verifies", []string{"--verify"}, worker, true},
		{"no models (a router, a client, a bootstrap)", []string{"--no-detect"}, nil, true},
		{"bridge without models", []string{"--no-detect", "--bridge", "127.0.0.1:0"}, nil, true},
		{"pure worker, view asked for", []string{"--swarm-view"}, worker, true},
		{"pure worker, view asked for in the config", []string{"--config", cfg}, worker, true},
		{"bridge, view refused", []string{"--bridge", "127.0.0.1:0", "--swarm-view=false"}, worker, false},
		{"router watching a model", []string{"--no-detect", "--watch", "llama3"}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}
			f, _, err := parseNodeFlags(e, append([]string{"--data-dir", t.TempDir()}, tc.args...))
			if err != nil {
				t.Fatal(err)
			}
			if got := f.swarmViewFor(tc.backends); got != tc.want {
				t.Errorf("mtor node %q serving %d backends: swarm view %v, want %v", tc.args, len(tc.backends), got, tc.want)
			}
		})
	}
	e := &env{stdout: &bytes.Buffer{}, stderr: &bytes.Buffer{}, getenv: func(string) string { return "" }}
	if _, _, err := parseNodeFlags(e, []string{"--data-dir", t.TempDir(), "--watch", "llama3", "--swarm-view=true"}); err == nil {
		t.Error("--watch with --swarm-view=true accepted, want a usage error")
	}
}
