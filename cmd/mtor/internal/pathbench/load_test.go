package pathbench

import (
	"testing"
	"time"
)

// TestResultCPUFigures checks the two CPU figures a row prints: the cores
// its processes kept busy and each process's CPU per streamed token.
func TestResultCPUFigures(t *testing.T) {
	cases := []struct {
		name     string
		r        Result
		cores    float64
		perToken map[string]time.Duration
	}{
		{"no processes", Result{Queries: 10, Elapsed: time.Second}, 0, nil},
		{"no time", Result{Queries: 10, CPU: map[string]time.Duration{"bench": time.Second}}, 0, nil},
		{"no tokens", Result{Queries: 10, Elapsed: time.Second, CPU: map[string]time.Duration{"bench": time.Second}},
			1, map[string]time.Duration{"bench": 0}},
		{"two processes over two seconds",
			Result{Queries: 100, Tokens: 16, Elapsed: 2 * time.Second, CPU: map[string]time.Duration{"bench": time.Second, "bridge": 2 * time.Second}},
			1.5, map[string]time.Duration{"bench": time.Second / (100 * 16), "bridge": 2 * time.Second / (100 * 16)}},
		{"failed queries stream no tokens",
			Result{Queries: 100, Errors: 50, Tokens: 256, Elapsed: time.Second, CPU: map[string]time.Duration{"node": time.Second}},
			1, map[string]time.Duration{"node": time.Second / (50 * 256)}},
		{"every query failed", Result{Queries: 4, Errors: 4, Tokens: 16, Elapsed: time.Second, CPU: map[string]time.Duration{"node": time.Second}},
			1, map[string]time.Duration{"node": 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.r.Cores(); got != tc.cores {
				t.Errorf("Cores() = %v, want %v", got, tc.cores)
			}
			for proc, want := range tc.perToken {
				if got := tc.r.CPUPerToken(proc); got != want {
					t.Errorf("CPUPerToken(%s) = %v, want %v", proc, got, want)
				}
			}
		})
	}
}
