package bridge

import (
	"bufio"
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

// nodeCommand is node running a script of bridge/e2e, bounded by the
// test's time; skipped without node_modules unless CI is set.
func nodeCommand(t *testing.T, script string, env []string, args ...string) *exec.Cmd {
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
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, node, append([]string{filepath.Join("e2e", script)}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	return cmd
}

// nodeScriptStart starts a script of bridge/e2e and gives its output line
// by line, for a test that acts on what the script says; the script's
// stderr is in cmd.Stderr.
func nodeScriptStart(t *testing.T, script string, env []string, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := nodeCommand(t, script, env, args...)
	cmd.Stderr = &strings.Builder{}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, bufio.NewScanner(out)
}

// nodeScript runs a script of bridge/e2e with node and returns its "ok"
// checks; skipped without node_modules unless CI is set.
func nodeScript(t *testing.T, script string, env []string, args ...string) map[string]map[string]any {
	t.Helper()
	cmd := nodeCommand(t, script, env, args...)
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

// TestOpenAIClientSeesTheBridgeStop: the official openai npm client, with
// a whole-answer query and a stream running on a real swarm's bridge,
// reads the bridge's error (bridge_stopping: a 503 with Retry-After, the
// stream's last event) when the bridge stops with no grace left, and
// both queries are cancelled at the worker.
func TestOpenAIClientSeesTheBridgeStop(t *testing.T) {
	r, sw, _ := newRealSwarm(t)
	_, addr, stop, served := serveToStop(t, r, 0)
	cmd, out := nodeScriptStart(t, "openai_shutdown.mjs", nil, "http://"+addr+"/v1")
	checks := map[string]map[string]any{}
	stopped := false
	for out.Scan() {
		line := out.Text()
		t.Logf("openai_shutdown.mjs: %s", line)
		if line == "ready" && !stopped {
			sw.waitStart(t, "SHUTDOWN-WHOLE")
			stop()
			stopped = true
		}
		if rest, ok := strings.CutPrefix(line, "ok "); ok {
			name, detail, _ := strings.Cut(rest, " ")
			var d map[string]any
			if err := json.Unmarshal([]byte(detail), &d); err != nil {
				t.Fatalf("check %s: bad detail %q", name, detail)
			}
			checks[name] = d
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("openai_shutdown.mjs failed: %v\nstderr:\n%s", err, cmd.Stderr)
	}
	if !stopped {
		t.Fatal("the client never said it was ready")
	}
	for _, want := range []string{"stream", "whole"} {
		if _, ok := checks[want]; !ok {
			t.Errorf("the client did not report check %q", want)
		}
	}
	<-served
	assertCancelled(t, sw, "SHUTDOWN-WHOLE")
	assertCancelled(t, sw, "SHUTDOWN-STREAM")
}
