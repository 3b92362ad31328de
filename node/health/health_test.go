package health

import (
	"testing"
	"time"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func TestScoreSteps(t *testing.T) {
	tests := []struct {
		name     string
		outcomes []Outcome
		want     float64
	}{
		{"fresh", nil, 100},
		{"success capped", []Outcome{Success, Success}, 100},
		{"one failure", []Outcome{Failure}, 80},
		{"timeout", []Outcome{Timeout}, 85},
		{"slow", []Outcome{Slow}, 95},
		{"violation", []Outcome{Violation}, 50},
		{"floor at zero", []Outcome{Failure, Failure, Failure, Failure, Failure, Failure}, 0},
		{"recovery is gradual", []Outcome{Failure, Failure, Success}, 65},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := New()
			for _, o := range tc.outcomes {
				tr.Record(o)
			}
			if got := tr.Score(); got != tc.want {
				t.Fatalf("score = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestBreakerOpensHalfOpensAndCloses(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	tr := New(WithThreshold(3), WithCooldown(10*time.Second, 40*time.Second), WithClock(clk.now))
	for i := 0; i < 2; i++ {
		tr.Record(Failure)
	}
	if tr.State() != Closed || !tr.Allow() {
		t.Fatal("breaker opened before the threshold")
	}
	tr.Record(Failure)
	if tr.State() != Open || tr.Allow() || tr.Available() {
		t.Fatal("breaker not open after 3 consecutive failures")
	}
	clk.advance(10 * time.Second)
	if tr.State() != HalfOpen || !tr.Available() {
		t.Fatalf("state = %v after cool-down, want half-open", tr.State())
	}
	if !tr.Allow() {
		t.Fatal("half-open breaker refused the trial")
	}
	if tr.Allow() {
		t.Fatal("half-open breaker allowed a second concurrent trial")
	}
	// Failed trial: open again with a doubled cool-down.
	tr.Record(Failure)
	clk.advance(10 * time.Second)
	if tr.State() != Open {
		t.Fatal("cool-down did not double after a failed trial")
	}
	clk.advance(10 * time.Second)
	if !tr.Allow() {
		t.Fatal("no trial after the doubled cool-down")
	}
	tr.Record(Success)
	if tr.State() != Closed || !tr.Allow() {
		t.Fatal("successful trial did not close the breaker")
	}
}

func TestBreakerTrialWithoutOutcomeIsReleased(t *testing.T) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	tr := New(WithThreshold(1), WithCooldown(time.Second, time.Minute), WithClock(clk.now))
	tr.Record(Failure)
	clk.advance(time.Second)
	if !tr.Allow() {
		t.Fatal("no trial")
	}
	if tr.Allow() {
		t.Fatal("second trial while first outstanding")
	}
	clk.advance(time.Second)
	if !tr.Allow() {
		t.Fatal("abandoned trial kept the breaker stuck")
	}
}

func TestSuccessResetsConsecutiveFailures(t *testing.T) {
	tr := New(WithThreshold(3))
	tr.Record(Failure)
	tr.Record(Failure)
	tr.Record(Success)
	tr.Record(Failure)
	tr.Record(Failure)
	if tr.State() != Closed {
		t.Fatal("non-consecutive failures opened the breaker")
	}
}

// One violation opens the breaker at once; a violation during the ban
// doubles it.
func TestViolationBansWithBackoff(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	tr := New(WithClock(clk.now), WithCooldown(time.Second, 8*time.Second))
	tr.Record(Violation)
	if tr.Allow() {
		t.Fatal("allowed right after a violation")
	}
	clk.advance(time.Second)
	if !tr.Allow() { // the half-open trial
		t.Fatal("no trial after the first ban")
	}
	tr.Record(Violation)
	clk.advance(time.Second)
	if tr.Available() {
		t.Fatal("second ban not longer than the first")
	}
	clk.advance(time.Second)
	if !tr.Available() {
		t.Fatal("second ban longer than twice the first")
	}
}

// TestViolated: a violation stands until a success or a slow answer; a
// failure neither sets nor clears it.
func TestViolated(t *testing.T) {
	for _, tc := range []struct {
		name string
		seq  []Outcome
		want bool
	}{
		{"nothing", nil, false},
		{"failures", []Outcome{Failure, Timeout, Failure}, false},
		{"a violation", []Outcome{Violation}, true},
		{"a violation, then failures", []Outcome{Violation, Failure, Timeout}, true},
		{"a violation, then a success", []Outcome{Violation, Success}, false},
		{"a violation, then a slow answer", []Outcome{Violation, Slow}, false},
		{"a success, then a violation", []Outcome{Success, Violation}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := New()
			for _, o := range tc.seq {
				tr.Record(o)
			}
			if got := tr.Violated(); got != tc.want {
				t.Fatalf("Violated() = %v, want %v", got, tc.want)
			}
		})
	}
}
