package canary

import (
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// Reputation defaults: a worker starts trusted (100); one canary it
// disagrees on costs far more than one it agrees on earns, so that a liar
// falls below the threshold after DefaultLoss-sized steps: 100 → 75 → 50
// → 25, excluded on its third failed canary. An honest worker that was
// unlucky once recovers within a few agreements.
const (
	DefaultGain      = 5.0
	DefaultLoss      = 25.0
	DefaultThreshold = 40.0
	// DefaultMaxPeers bounds the book; see Book.Record for eviction.
	DefaultMaxPeers = 4096
	maxScore        = 100.0
)

// Stats is what the book holds of one peer.
type Stats struct {
	Score     float64 // 0..100
	Agreed    int     // canaries it agreed with the majority (or reference) on
	Disagreed int     // canaries it disagreed on
}

// Book keeps a bounded reputation score per peer. It is safe for
// concurrent use, and it is the router's Reputation.
type Book struct {
	mu        sync.Mutex
	gain      float64
	loss      float64
	threshold float64
	max       int
	peers     map[peer.ID]*entry
	now       func() time.Time
}

type entry struct {
	Stats
	updated time.Time
}

// BookOption configures a Book.
type BookOption func(*Book)

// WithSteps sets what one agreeing canary earns and one disagreeing canary
// costs, in points of 0..100.
func WithSteps(gain, loss float64) BookOption {
	return func(b *Book) {
		if gain >= 0 && loss > 0 {
			b.gain, b.loss = gain, loss
		}
	}
}

// WithThreshold sets the score under which a peer gets no traffic.
func WithThreshold(t float64) BookOption {
	return func(b *Book) {
		if t >= 0 && t <= maxScore {
			b.threshold = t
		}
	}
}

// WithMaxPeers bounds how many peers the book remembers.
func WithMaxPeers(n int) BookOption {
	return func(b *Book) {
		if n > 0 {
			b.max = n
		}
	}
}

// NewBook returns an empty book: every peer at 100.
func NewBook(opts ...BookOption) *Book {
	b := &Book{gain: DefaultGain, loss: DefaultLoss, threshold: DefaultThreshold, max: DefaultMaxPeers,
		peers: map[peer.ID]*entry{}, now: time.Now}
	for _, o := range opts {
		o(b)
	}
	return b
}

// Score is p's reputation, 0..100; 100 for a peer never checked.
func (b *Book) Score(p peer.ID) float64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.peers[p]; e != nil {
		return e.Score
	}
	return maxScore
}

// Distrusted reports whether p is below the threshold.
func (b *Book) Distrusted(p peer.ID) bool { return b.Score(p) < b.threshold }

// Threshold is the score under which a peer gets no traffic.
func (b *Book) Threshold() float64 { return b.threshold }

// Stats is what the book holds of p (a zero count and 100 if nothing).
func (b *Book) Stats(p peer.ID) Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.peers[p]; e != nil {
		return e.Stats
	}
	return Stats{Score: maxScore}
}

// Record adds the verdict of one canary on p. When the book is full it
// forgets the best-scored, least recently updated peer: forgetting a
// trusted peer costs nothing (it comes back at 100), forgetting a liar
// would let it back in.
func (b *Book) Record(p peer.ID, agreed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.peers[p]
	if e == nil {
		if len(b.peers) >= b.max {
			b.evictLocked()
		}
		e = &entry{Stats: Stats{Score: maxScore}}
		b.peers[p] = e
	}
	if agreed {
		e.Agreed++
		e.Score = min(e.Score+b.gain, maxScore)
	} else {
		e.Disagreed++
		e.Score = max(e.Score-b.loss, 0)
	}
	e.updated = b.now()
}

func (b *Book) evictLocked() {
	var victim peer.ID
	var ve *entry
	for p, e := range b.peers {
		if ve == nil || e.Score > ve.Score || (e.Score == ve.Score && e.updated.Before(ve.updated)) {
			victim, ve = p, e
		}
	}
	delete(b.peers, victim)
}

// Len is how many peers the book remembers.
func (b *Book) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.peers)
}
