package bridge

import (
	"context"
	"encoding/json"
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
	const key = "e2e-test-key"
	r, sw, workerID := newRealSwarm(t)
	_, base := startBridge(t, r, WithAPIKeys([]string{key}))
	checks := nodeScript(t, "openai_client.mjs", []string{"MTOR_API_KEY=" + key}, base+"/v1")
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

// nodeScript runs a script of bridge/e2e with node and returns its "ok"
// checks; skipped without node_modules unless CI is set.
func nodeScript(t *testing.T, script string, env []string, args ...string) map[string]map[string]any {
	t.Helper()
	node, err := exec.LookPath("node")
	_, modErr := os.Stat(filepath.Join("e2e", "node_modules", "openai", "package.json"))
	if err != nil || modErr != nil {
		if os.Getenv("CI") == "" {
			t.Skip("npm clients not installed: run `npm ci` in bridge/e2e (needs node >= 20)")
		}
		t.Fatalf("CI is set but node cannot run: node: %v, bridge/e2e/node_modules: %v", err, modErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, append([]string{filepath.Join("e2e", script)}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	t.Logf("%s output:\n%s", script, out)
	if err != nil {
		t.Fatalf("%s failed: %v\nstderr:\n%s", script, err, stderr.String())
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
	return checks
}
