package node

import (
	"testing"
	"time"
)

// The waits double from the floor to the ceiling, each spread by up to
// half again, and start over after a reset.
func TestBackoffDoublesSpreadAndResets(t *testing.T) {
	b := backoff{floor: 2 * time.Second, ceil: 10 * time.Second}
	for round := range 50 {
		for i, base := range []time.Duration{2, 4, 8, 10, 10} {
			base *= time.Second
			if w := b.next(); w < base || w > base+base/2 {
				t.Fatalf("round %d, wait %d: %s, want %s to %s", round, i, w, base, base+base/2)
			}
		}
		b.reset()
	}
}
