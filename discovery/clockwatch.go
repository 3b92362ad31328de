package discovery

import (
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// clockWatch notices announcements dated outside the window the validator
// accepts (more than protocol.MaxClockSkew ahead of this machine's clock,
// or expired) and says when several authors within a minute were off the
// same way: then this machine's clock, not theirs, is the likely culprit.
// A volunteer's node whose clock runs minutes ahead sees every other
// node's announcements as expired, and the swarm ignores its own: without
// this it would sit idle with nothing in its log to say why.
type clockWatch struct {
	mu     sync.Mutex
	since  time.Time                 // start of the current period
	off    map[peer.ID]time.Duration // authors off in the period: announcement date minus this clock
	warned time.Time
}

const (
	clockPeriod    = time.Minute
	clockAuthors   = 3 // authors off the same way in a period
	clockWarnEvery = 10 * time.Minute
	clockMaxAuthor = 64 // authors remembered per period
)

// note records that author's announcement, dated off from this machine's
// clock at now, fell outside the window. It reports whether to warn now,
// with how many authors were off in that direction and their median
// offset.
func (w *clockWatch) note(author peer.ID, off time.Duration, now time.Time) (warn bool, authors int, median time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.off == nil || now.Sub(w.since) > clockPeriod {
		w.off, w.since = map[peer.ID]time.Duration{}, now
	}
	if _, ok := w.off[author]; ok || len(w.off) < clockMaxAuthor {
		w.off[author] = off
	}
	var same []time.Duration
	for _, o := range w.off {
		if (o > 0) == (off > 0) {
			same = append(same, o)
		}
	}
	if len(same) < clockAuthors || (!w.warned.IsZero() && now.Sub(w.warned) < clockWarnEvery) {
		return false, len(same), 0
	}
	w.warned = now
	slices.Sort(same)
	return true, len(same), same[len(same)/2]
}
