package worker

import (
	"slices"
	"sync"
	"time"
)

// modelStats are measured figures of one model from real queries.
type modelStats struct {
	mu        sync.Mutex
	ttfts     [64]uint32 // ring of recent TTFTs in ms
	n         int
	next      int
	tokPerSec float64 // EWMA of completion tokens per second of generation
}

const ewmaAlpha = 0.2

func ewma(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return old + ewmaAlpha*(v-old)
}

// record adds one successful query.
func (s *modelStats) record(ttft, total time.Duration, tokens uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ttfts[s.next] = uint32(ttft.Milliseconds())
	s.next = (s.next + 1) % len(s.ttfts)
	if s.n < len(s.ttfts) {
		s.n++
	}
	gen := total - ttft
	if tokens > 1 && gen > 0 {
		s.tokPerSec = ewma(s.tokPerSec, float64(tokens-1)/gen.Seconds())
	}
}

// snapshot returns tokens/s and p50 TTFT in ms.
func (s *modelStats) snapshot() (float32, uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var p50 uint32
	if s.n > 0 {
		v := slices.Clone(s.ttfts[:s.n])
		slices.Sort(v)
		p50 = v[len(v)/2]
	}
	return float32(s.tokPerSec), p50
}
