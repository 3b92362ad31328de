package pathbench

import (
	"testing"
	"time"
)

// TestSplitCPU: the fit of CPU per answer against answer length.
func TestSplitCPU(t *testing.T) {
	row := func(tokens, queries int, errs int64, cpu time.Duration) Result {
		return Result{Tokens: tokens, Queries: queries, Errors: errs, CPU: map[string]time.Duration{"bridge": cpu}}
	}
	// 100 µs per answer and 2 µs per token: 132 µs at 16 tokens, 612 µs at 256.
	cases := []struct {
		name string
		rows []Result
		want CPUSplit
		ok   bool
	}{
		{"two lengths", []Result{row(16, 100, 0, 100*132*time.Microsecond), row(256, 10, 0, 10*612*time.Microsecond)},
			CPUSplit{PerAnswer: 100 * time.Microsecond, PerToken: 2 * time.Microsecond}, true},
		{"three lengths on the line", []Result{row(1, 50, 0, 50*102*time.Microsecond), row(16, 100, 0, 100*132*time.Microsecond), row(256, 10, 0, 10*612*time.Microsecond)},
			CPUSplit{PerAnswer: 100 * time.Microsecond, PerToken: 2 * time.Microsecond}, true},
		{"failed queries count no answers", []Result{row(16, 200, 100, 100*132*time.Microsecond), row(256, 10, 0, 10*612*time.Microsecond)},
			CPUSplit{PerAnswer: 100 * time.Microsecond, PerToken: 2 * time.Microsecond}, true},
		{"one length", []Result{row(16, 100, 0, time.Second), row(16, 50, 0, time.Second)}, CPUSplit{}, false},
		{"one row", []Result{row(16, 100, 0, time.Second)}, CPUSplit{}, false},
		{"a row of failures only", []Result{row(16, 10, 10, time.Second), row(256, 10, 0, time.Second)}, CPUSplit{}, false},
		{"another process", []Result{{Tokens: 16, Queries: 10, CPU: map[string]time.Duration{"node": time.Second}}, {Tokens: 256, Queries: 10, CPU: map[string]time.Duration{"node": time.Second}}},
			CPUSplit{}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := SplitCPU(tc.rows, "bridge")
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			// Within a nanosecond: the fit is in floating point.
			if d := got.PerAnswer - tc.want.PerAnswer; d < -1 || d > 1 {
				t.Errorf("per answer %v, want %v", got.PerAnswer, tc.want.PerAnswer)
			}
			if d := got.PerToken - tc.want.PerToken; d < -1 || d > 1 {
				t.Errorf("per token %v, want %v", got.PerToken, tc.want.PerToken)
			}
		})
	}
}
