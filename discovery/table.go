package discovery

import (
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// EventKind says what happened to a peer of the table.
type EventKind int

// Event kinds.
const (
	Join   EventKind = iota + 1 // first announcement from a peer
	Update                      // newer announcement from a known peer
	Leave                       // entry removed; Event.Reason says why
)

func (k EventKind) String() string {
	switch k {
	case Join:
		return "join"
	case Update:
		return "update"
	case Leave:
		return "leave"
	}
	return "unknown"
}

// Reasons carried by Leave events.
const (
	ReasonExpired      = "expired"      // no announcement within its TTL
	ReasonDisconnected = "disconnected" // the host lost its last connection to the peer
	ReasonClosed       = "closed"       // the table was closed
)

// Event is a change of the peer table.
type Event struct {
	Kind   EventKind
	Peer   peer.ID
	Reason string // for Leave: ReasonExpired, ReasonDisconnected, ...
}

// Entry is one announcing peer. Announce is shared with other readers and
// must not be modified.
type Entry struct {
	Peer     peer.ID
	Self     bool // the local node's own announcement
	Announce *pb.Announce
	Received time.Time
	Expires  time.Time
	RTT      time.Duration // smoothed RTT of our pings (0 = unknown)
}

const (
	minSubscriberBuf = 1
	maxSubscriberBuf = 4096
)

type subscriber struct {
	ch      chan Event
	dropped uint64
}

// PeerTable holds the last announcement of every peer that announced,
// until it expires or the peer disconnects. It is safe for concurrent use;
// event delivery never blocks it.
type PeerTable struct {
	self peer.ID
	max  int
	now  func() time.Time

	mu      sync.Mutex
	entries map[peer.ID]*Entry
	subs    map[*subscriber]struct{}
	full    bool // logged that the table is full; reset when it has room
	closed  bool
}

func newPeerTable(self peer.ID, max int, now func() time.Time) *PeerTable {
	if now == nil {
		now = time.Now
	}
	return &PeerTable{
		self:    self,
		max:     max,
		now:     now,
		entries: make(map[peer.ID]*Entry),
		subs:    make(map[*subscriber]struct{}),
	}
}

// Snapshot returns the live entries, sorted by peer ID.
func (t *PeerTable) Snapshot() []Entry {
	now := t.now()
	t.mu.Lock()
	out := make([]Entry, 0, len(t.entries))
	for _, e := range t.entries {
		if e.Expires.After(now) {
			out = append(out, *e)
		}
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b Entry) int {
		switch {
		case a.Peer < b.Peer:
			return -1
		case a.Peer > b.Peer:
			return 1
		}
		return 0
	})
	return out
}

// Get returns the live entry of p.
func (t *PeerTable) Get(p peer.ID) (Entry, bool) {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[p]
	if !ok || !e.Expires.After(now) {
		return Entry{}, false
	}
	return *e, true
}

// Len is the number of entries, expired ones not yet swept included.
func (t *PeerTable) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}

// Subscribe returns a channel of table events with room for buf events
// (clamped to [1, 4096]) and a function that ends the subscription and
// closes the channel. A subscriber that falls behind loses events (they
// are counted and logged); it never slows the table.
func (t *PeerTable) Subscribe(buf int) (<-chan Event, func()) {
	buf = max(minSubscriberBuf, min(buf, maxSubscriberBuf))
	s := &subscriber{ch: make(chan Event, buf)}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		close(s.ch)
		return s.ch, func() {}
	}
	t.subs[s] = struct{}{}
	var once sync.Once
	return s.ch, func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			if _, ok := t.subs[s]; ok {
				delete(t.subs, s)
				close(s.ch)
			}
		})
	}
}

// emitLocked sends ev to every subscriber without blocking. t.mu is held,
// which also orders sends against the close in unsubscribe.
func (t *PeerTable) emitLocked(ev Event) {
	for s := range t.subs {
		select {
		case s.ch <- ev:
		default:
			s.dropped++
			// Log the first drop and then every 100th, not every one.
			if s.dropped%100 == 1 {
				log.Warnw("peer table subscriber is slow; dropping events", "dropped", s.dropped, "buffer", cap(s.ch))
			}
		}
	}
}

// upsert records an announcement from p received at recv. It ignores an
// announcement whose seq is not newer than the one held, so that
// reordering between validation and delivery cannot roll an entry back.
// It reports whether the table changed.
func (t *PeerTable) upsert(p peer.ID, a *pb.Announce, recv time.Time) bool {
	ttl := time.Duration(a.GetTtlMs()) * time.Millisecond
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	if e, ok := t.entries[p]; ok {
		if a.GetSeq() <= e.Announce.GetSeq() {
			return false
		}
		e.Announce, e.Received, e.Expires = a, recv, recv.Add(ttl)
		t.emitLocked(Event{Kind: Update, Peer: p})
		return true
	}
	if len(t.entries) >= t.max && p != t.self {
		if !t.full {
			t.full = true
			log.Warnw("peer table is full; ignoring announcements from new peers", "max", t.max)
		}
		return false
	}
	t.entries[p] = &Entry{Peer: p, Self: p == t.self, Announce: a, Received: recv, Expires: recv.Add(ttl)}
	t.emitLocked(Event{Kind: Join, Peer: p})
	return true
}

// remove drops p's entry, emitting Leave with reason, and reports whether
// there was one.
func (t *PeerTable) remove(p peer.ID, reason string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.removeLocked(p, reason)
}

func (t *PeerTable) removeLocked(p peer.ID, reason string) bool {
	if _, ok := t.entries[p]; !ok {
		return false
	}
	delete(t.entries, p)
	if t.full && len(t.entries) < t.max {
		t.full = false
		log.Infow("peer table has room again", "entries", len(t.entries))
	}
	t.emitLocked(Event{Kind: Leave, Peer: p, Reason: reason})
	return true
}

// sweep removes every entry expired at now and returns how many.
func (t *PeerTable) sweep(now time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for p, e := range t.entries {
		if !e.Expires.After(now) {
			t.removeLocked(p, ReasonExpired)
			n++
		}
	}
	return n
}

// setRTT records a measured RTT for p, if p is still in the table.
func (t *PeerTable) setRTT(p peer.ID, rtt time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.entries[p]; ok {
		e.RTT = rtt
	}
}

// close ends every subscription; later changes are refused.
func (t *PeerTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.closed = true
	for s := range t.subs {
		close(s.ch)
		delete(t.subs, s)
	}
}
