package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestOpenAIClient runs the official openai npm client (bridge/e2e, pinned
// in package.json) against a bridge on a client node of a real swarm
// (node/swarmtest); the queries reach the worker over libp2p. Locally it is
// skipped when `npm ci` has not been run in bridge/e2e; in CI (CI set) it
// must run.
func TestOpenAIClient(t *testing.T) {
	node, err := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("e2e", "node_modules", "openai", "package.json"))
	if err != nil || modErr != nil {
		if os.Getenv("CI") == "" {
			t.Skip("openai npm client not installed: run `npm ci` in bridge/e2e (needs node >= 20) to run this test")
		}
		t.Fatalf("CI is set but the openai client cannot run: node: %v, bridge/e2e/node_modules: %v", err, modErr)
	}
	const key = "e2e-test-key"
	r, sw, workerID := newRealSwarm(t)
	_, base := startBridge(t, r, WithAPIKeys([]string{key}))

	ctx, cancel := context.WithTimeout(context.Background(), 2*testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, filepath.Join("e2e", "openai_client.mjs"), base+"/v1")
	cmd.Env = append(os.Environ(), "MTOR_API_KEY="+key)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	t.Logf("openai client output:\n%s", out)
	if err != nil {
		var ee *exec.ExitError
		errors.As(err, &ee)
		t.Fatalf("openai client failed: %v\nstderr:\n%s", err, stderr.String())
	}

	checks := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		rest, ok := strings.CutPrefix(line, "ok ")
		if !ok {
			continue
		}
		name, detail, _ := strings.Cut(rest, " ")
		var d map[string]any
		if err := json.Unmarshal([]byte(detail), &d); err != nil {
			t.Fatalf("check %s: bad detail %q", name, detail)
		}
		checks[name] = d
	}
	for _, want := range []string{"models", "chat", "stream", "errors", "embeddings", "media", "abort"} {
		if _, ok := checks[want]; !ok {
			t.Errorf("the client did not report check %q", want)
		}
	}
	if p, _ := checks["chat"]["peer"].(string); p != workerID.String() {
		t.Errorf("X-Mtor-Peer seen by the client: %q, want the worker %s", p, workerID)
	}
	if n, _ := checks["stream"]["deltas"].(float64); n < 4 {
		t.Errorf("streamed deltas: %v", checks["stream"]["deltas"])
	}
	// The abort must have reached the worker: its backend call for the
	// aborted stream ended with a cancelled context, and nothing runs.
	assertCancelled(t, sw, "ABORT-TEST")
}
