package main

import (
	"encoding/json"
	"testing"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestE2EBenchComparesPaths runs `mtor bench` small: every path (direct,
// the Go proxy, nginx where installed, bridge → worker on TCP and on
// QUIC, one node) answers
// whole streamed answers at each level and in the slow-stream rows, and
// the CPU of each measured process is counted.
func TestE2EBenchComparesPaths(t *testing.T) {
	needBinary(t)
	code, stdout, stderr := mtor(t, "bench", "--queries", "40", "--concurrency", "1,4", "--streams", "4", "--json")
	if code != 0 {
		t.Fatalf("mtor bench: exit %d: %s", code, stderr)
	}
	var rep struct {
		Rows    []pathbench.Result `json:"rows"`
		Streams []pathbench.Result `json:"streams"`
	}
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("bench --json: %v\n%s", err, stdout)
	}
	seen := map[string]int{}
	for _, r := range append(rep.Rows, rep.Streams...) {
		seen[r.Path]++
		if r.Errors != 0 || r.P50 <= 0 {
			t.Errorf("%s at %d: %d errors (%s), p50 %s", r.Path, r.Concurrency, r.Errors, r.FirstError, r.P50)
		}
	}
	paths := []string{"direct", "go-proxy", "mtor", "mtor-quic", "mtor1"}
	if pathbench.NginxPath() != "" {
		paths = append(paths, "nginx")
	}
	for _, p := range paths {
		if seen[p] != 4 {
			t.Errorf("path %s: %d rows, want 2 levels + 2 stream rows", p, seen[p])
		}
	}
	for _, r := range rep.Rows {
		roles := map[string][]string{"go-proxy": {"proxy"}, "nginx": {"nginx"}, "mtor": {"bridge", "worker"}, "mtor-quic": {"bridge", "worker"}, "mtor1": {"node"}}[r.Path]
		for _, role := range roles {
			if _, ok := r.CPU[role]; !ok {
				t.Errorf("%s at %d: no CPU time for %s", r.Path, r.Concurrency, role)
			}
		}
	}
	t.Logf("bench rows: %d, stream rows: %d", len(rep.Rows), len(rep.Streams))
}
