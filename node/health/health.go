// Package health scores how well a peer or backend has been doing (a
// seed-style 0..100 score) and guards it with a circuit breaker.
package health

import (
	"sync"
	"time"
)

// Outcome is the result of one probe or query.
type Outcome int

const (
	Success Outcome = iota
	Failure         // refused, backend error, dead connection
	Timeout         // no answer in time
	Slow            // answered, but far slower than expected
	// Violation is misbehaviour no honest peer shows (endless output, a
	// broken protocol): the breaker opens at once, and each further one
	// doubles the ban, as a failed half-open trial does.
	Violation
)

// Score steps, as in the seed: failures cost more than successes earn so
// that a flapping worker sinks, and recovery is gradual.
const (
	stepSuccess = 5
	stepFailure = -20
	stepTimeout = -15
	stepSlow    = -5
	stepViolate = -50
	maxScore    = 100
)

// BreakerState is the circuit breaker state.
type BreakerState int

const (
	Closed   BreakerState = iota // normal
	Open                         // failing: skip until the cool-down ends
	HalfOpen                     // cool-down over: one trial allowed
)

func (s BreakerState) String() string {
	switch s {
	case Open:
		return "open"
	case HalfOpen:
		return "half-open"
	}
	return "closed"
}

// Tracker holds a score and a circuit breaker. It is safe for concurrent use.
type Tracker struct {
	mu        sync.Mutex
	score     float64
	fails     int // consecutive failures
	state     BreakerState
	openedAt  time.Time
	cooldown  time.Duration
	trialOut  bool // a half-open trial is in flight
	violated  bool // a violation since the last success
	trialAt   time.Time
	threshold int
	base      time.Duration
	max       time.Duration
	now       func() time.Time
}

// Option configures a Tracker.
type Option func(*Tracker)

// WithThreshold sets how many consecutive failures open the breaker.
func WithThreshold(n int) Option { return func(t *Tracker) { t.threshold = n } }

// WithCooldown sets the first and the largest open period; each failed
// trial doubles the period up to max (exponential backoff, as Petals bans).
func WithCooldown(base, max time.Duration) Option {
	return func(t *Tracker) { t.base, t.max = base, max }
}

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option { return func(t *Tracker) { t.now = now } }

// New returns a tracker at full health with a closed breaker.
func New(opts ...Option) *Tracker {
	t := &Tracker{score: maxScore, threshold: 3, base: 5 * time.Second, max: 2 * time.Minute, now: time.Now}
	for _, o := range opts {
		o(t)
	}
	t.cooldown = t.base
	return t
}

// Record adds an outcome to the score and the breaker.
func (t *Tracker) Record(o Outcome) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch o {
	case Success:
		t.score += stepSuccess
		t.fails, t.violated = 0, false
		if t.state != Closed {
			t.state, t.cooldown = Closed, t.base
		}
		t.trialOut = false
	case Slow:
		t.score += stepSlow
		t.fails, t.violated = 0, false
		if t.state != Closed {
			t.state, t.cooldown = Closed, t.base
		}
		t.trialOut = false
	case Violation:
		t.score += stepViolate
		t.fails++
		t.violated = true
		if t.state != Closed {
			t.cooldown = min(t.cooldown*2, t.max)
		}
		t.state, t.openedAt, t.trialOut = Open, t.now(), false
	case Failure, Timeout:
		if o == Failure {
			t.score += stepFailure
		} else {
			t.score += stepTimeout
		}
		t.fails++
		switch {
		case t.state == HalfOpen || (t.state == Open && t.trialOut):
			// The trial failed: back off longer.
			t.cooldown *= 2
			if t.cooldown > t.max {
				t.cooldown = t.max
			}
			t.state, t.openedAt, t.trialOut = Open, t.now(), false
		case t.state == Closed && t.fails >= t.threshold:
			t.state, t.openedAt = Open, t.now()
		}
	}
	t.score = min(max(t.score, 0), maxScore)
}

// Score is the health score, 0..100.
func (t *Tracker) Score() float64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.score
}

// State is the breaker state now.
func (t *Tracker) State() BreakerState {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stateLocked()
}

func (t *Tracker) stateLocked() BreakerState {
	if t.state != Open {
		return t.state
	}
	now := t.now()
	// A trial whose outcome never came (the caller gave up) frees the slot
	// again after one more cool-down, so the breaker cannot stick open.
	if t.trialOut && now.Sub(t.trialAt) >= t.cooldown {
		t.trialOut = false
	}
	if !t.trialOut && now.Sub(t.openedAt) >= t.cooldown {
		return HalfOpen
	}
	return t.state
}

// Allow reports whether a call may go ahead now. In the half-open state it
// lets exactly one trial through until that trial's outcome is recorded.
func (t *Tracker) Allow() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch t.stateLocked() {
	case Closed:
		return true
	case HalfOpen:
		t.trialOut, t.trialAt = true, t.now()
		return true
	}
	return false
}

// Clean reports whether nothing stands against the peer: full score, no
// failure since its last success, breaker closed.
func (t *Tracker) Clean() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.score >= maxScore && t.fails == 0 && t.stateLocked() == Closed
}

// Violated reports whether the peer broke the protocol since its last
// success: a breaker opened by a violation is a ban, not a failure a
// caller may look past.
func (t *Tracker) Violated() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.violated
}

// Available is Allow without taking the half-open trial slot: whether a
// call could go ahead. Used when ranking candidates.
func (t *Tracker) Available() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stateLocked() != Open
}
