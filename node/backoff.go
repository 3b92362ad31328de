package node

import (
	"math/rand/v2"
	"time"
)

// backoff is a wait that doubles from floor to ceil with each failure,
// each wait spread by up to half again, so that nodes that failed
// together (the workers of a restarted bootstrap) do not retry together.
type backoff struct {
	floor, ceil time.Duration
	cur         time.Duration // the unspread wait after the next failure; 0: floor
}

// next returns the wait before the next attempt and doubles the one
// after it.
func (b *backoff) next() time.Duration {
	w := max(b.cur, b.floor)
	b.cur = min(2*w, b.ceil)
	return w + rand.N(w/2+1)
}

// reset starts the waits at the floor again.
func (b *backoff) reset() { b.cur = 0 }
