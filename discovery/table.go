package discovery

import (
	"cmp"
	"iter"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
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
	ReasonQuarantine   = "quarantine"   // over the limits for its IP; back in quarantine
	// ReasonReplaced: a clearly better worker of one of its models took
	// its place under the per-model bound.
	ReasonReplaced = "replaced"
	// ReasonNoRoom: it changed its models to ones at the per-model
	// bound, with no clearly worse worker to replace; a newcomer
	// announcing them would not be taken either.
	ReasonNoRoom = "no room"
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
	// RTTRelayed: RTT was measured through a relay (no direct connection).
	RTTRelayed bool
	IP         string // address of our connection to it when admitted ("" unknown)
	// unusableUntil: the router found it unusable (failing, busy) and
	// asked for other workers; until then it is the first to be replaced.
	unusableUntil time.Time
	// measuredTTFTMs: the router's own smoothed time to first token of
	// this process (0 none yet), which judges a kept worker under the
	// per-model bound in place of what it announces.
	measuredTTFTMs float64
}

// origin is how an announcement reached us, for the quarantine.
type origin struct {
	via    peer.ID // the peer that delivered it: the author itself, or a gossip forwarder
	viaIP  string  // IP of our connection to via ("" unknown)
	proven bool    // the author is connected to us: it holds its key and is reachable
	ip     string  // IP of our connection to the author, when proven
	// rtt: libp2p's latency estimate of the author (0 unknown), to weigh
	// it against kept workers when its models are at their bound.
	rtt time.Duration
}

// pendingEntry is an announcement of a peer we have never been connected
// to: quarantined, invisible to readers and to routing, until a probe
// (a dial, which proves the key) succeeds.
type pendingEntry struct {
	Entry
	via       peer.ID
	viaIP     string
	nextProbe time.Time
	probes    int
}

// tableLimits bound what gossip can put into the table. Quarantined
// entries are bounded in all, per delivering peer and per its IP, so one
// host relaying announcements of thousands of fresh keys fills only its
// own share; admitted entries are bounded per IP, so one machine running
// many real identities fills only its share.
type tableLimits struct {
	pending      int
	perForwarder int
	perIP        int
	// perModel, when positive, bounds the workers kept per model: an
	// author is taken while one of its models has room, or in place of a
	// clearly worse kept worker (replaceableLocked). Zero: no bound (a
	// node with the swarm view holds every worker).
	perModel int
}

// perIPBounded reports whether admitted peers at ip count against the
// per-IP bound: not those of this machine (loopback), whose processes are
// its operator's, as gossipsub's colocation penalty leaves them out too.
func perIPBounded(ip string) bool {
	if ip == "" {
		return false
	}
	a, err := netip.ParseAddr(ip)
	return err != nil || !a.IsLoopback()
}

func defaultLimits() tableLimits {
	return tableLimits{pending: DefaultMaxPending, perForwarder: DefaultMaxPerForwarder, perIP: DefaultMaxPerIP}
}

// provenTTL is how long a peer that was connected to us may rejoin the
// table through gossip without a new probe (after the connection manager
// trimmed its connection, say).
const provenTTL = 30 * time.Minute

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

	lim  tableLimits
	wake chan struct{} // tells the prober that a peer entered quarantine

	mu       sync.Mutex
	entries  map[peer.ID]*Entry
	pending  map[peer.ID]*pendingEntry
	perVia   map[peer.ID]int // pending entries per delivering peer
	perViaIP map[string]int  // pending entries per IP of the delivering peer
	perIP    map[string]int  // admitted entries per IP
	// admitted and pending entries per model they announce
	perModel, pendingPerModel map[string]int
	// byModel indexes the admitted entries (ours too) by the models they
	// announce: a routing decision reads one model's workers, and a
	// swarm view holds every worker of every model.
	byModel map[string]map[peer.ID]struct{}
	proven  map[peer.ID]proof // peers connected to us lately; bounded by max
	// allow, when set, says whether an admitted author may announce a
	// (a closed swarm's roles); nil allows everything.
	allow func(peer.ID, *pb.Announce) bool
	// watchOnly (a node without the swarm view): the per-model bound
	// counts only the models in watched, those whose topics this node
	// reads (the topics tell it: setWatched). A model it does not read (a
	// name any announcement may make up, always with room) neither gets
	// an author in nor keeps one from being replaced.
	watchOnly bool
	watched   map[string]struct{}
	subs      map[*subscriber]struct{}
	full      bool // logged that the table is full; reset when it has room
	closed    bool
}

func newPeerTable(self peer.ID, max int, now func() time.Time) *PeerTable {
	if now == nil {
		now = time.Now
	}
	return &PeerTable{
		self:     self,
		max:      max,
		now:      now,
		lim:      defaultLimits(),
		wake:     make(chan struct{}, 1),
		entries:  make(map[peer.ID]*Entry),
		watched:  make(map[string]struct{}),
		pending:  make(map[peer.ID]*pendingEntry),
		perVia:   make(map[peer.ID]int),
		perViaIP: make(map[string]int),
		perIP:    make(map[string]int),
		perModel: make(map[string]int),
		byModel:  make(map[string]map[peer.ID]struct{}),
		// pending entries per model
		pendingPerModel: make(map[string]int),
		proven:          make(map[peer.ID]proof),
		subs:            make(map[*subscriber]struct{}),
	}
}

type proof struct {
	ip string
	at time.Time
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
	slices.SortFunc(out, byPeer)
	return out
}

// SnapshotModel returns the live entries that announce model, sorted by
// peer ID: one model's workers without a copy of the whole table.
func (t *PeerTable) SnapshotModel(model string) []Entry {
	now := t.now()
	t.mu.Lock()
	set := t.byModel[model]
	out := make([]Entry, 0, len(set))
	for p := range set {
		if e := t.entries[p]; e != nil && e.Expires.After(now) {
			out = append(out, *e)
		}
	}
	t.mu.Unlock()
	slices.SortFunc(out, byPeer)
	return out
}

func byPeer(a, b Entry) int { return cmp.Compare(a.Peer, b.Peer) }

// indexLocked adds p under each model a announces, or removes it.
func (t *PeerTable) indexLocked(p peer.ID, a *pb.Announce, add bool) {
	for _, m := range a.GetModels() {
		name := m.GetName()
		set := t.byModel[name]
		switch {
		case add && set == nil:
			t.byModel[name] = map[peer.ID]struct{}{p: {}}
		case add:
			set[p] = struct{}{}
		case set != nil:
			if delete(set, p); len(set) == 0 {
				delete(t.byModel, name)
			}
		}
	}
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

// upsert records an announcement from a peer known to hold its key and be
// reachable (our own, or one delivered over a connection to its author).
func (t *PeerTable) upsert(p peer.ID, a *pb.Announce, recv time.Time) bool {
	return t.offer(p, a, recv, origin{via: p, proven: true})
}

// offer records an announcement from p received at recv. An entry is
// admitted (visible, routable, Join emitted) when p is proven: connected
// to us now or lately. Otherwise it waits in quarantine, within the
// limits, for the prober. An announcement whose seq is not newer than the
// one held is ignored, so that reordering between validation and delivery
// cannot roll an entry back. It reports whether the visible table changed.
func (t *PeerTable) offer(p peer.ID, a *pb.Announce, recv time.Time, o origin) bool {
	ttl := time.Duration(a.GetTtlMs()) * time.Millisecond
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	if p != t.self && t.allow != nil && !t.allow(p, a) {
		// Only for admitted (or proven) authors can this be judged:
		// a quarantined one is judged when it is proven.
		if _, ok := t.entries[p]; ok || o.proven {
			log.Debugw("announcement beyond the author's roles ignored", "peer", p)
			return false
		}
	}
	if e, ok := t.entries[p]; ok {
		if a.GetSeq() <= e.Announce.GetSeq() {
			return false
		}
		if !e.Self {
			countModels(t.perModel, e.Announce, -1)
			if !t.keepsChangedLocked(e, a) {
				countModels(t.perModel, e.Announce, 1) // as removeLocked expects
				log.Debugw("kept worker moved to models at their bound; dropped", "peer", p, "max", t.lim.perModel)
				t.removeLocked(p, ReasonNoRoom)
				return true
			}
			countModels(t.perModel, a, 1)
		}
		if a.GetIncarnation() != e.Announce.GetIncarnation() {
			e.measuredTTFTMs = 0 // a new process: the router starts afresh too
		}
		t.indexLocked(p, e.Announce, false)
		t.indexLocked(p, a, true)
		e.Announce, e.Received, e.Expires = a, recv, recv.Add(ttl)
		t.emitLocked(Event{Kind: Update, Peer: p})
		return true
	}
	if !o.proven && p != t.self {
		if pr, ok := t.proven[p]; ok && recv.Sub(pr.at) < provenTTL {
			o.proven, o.ip = true, pr.ip
		}
	}
	e := Entry{Peer: p, Self: p == t.self, Announce: a, Received: recv, Expires: recv.Add(ttl), IP: o.ip}
	pe := t.pending[p]
	if pe != nil && a.GetSeq() <= pe.Announce.GetSeq() {
		if !o.proven {
			return false
		}
		e.Announce, e.Received, e.Expires = pe.Announce, pe.Received, pe.Expires
	}
	if o.proven || e.Self {
		// A proven peer that finds no room (table full, its IP over
		// its share) is dropped, not quarantined: a probe would not
		// change that.
		return t.admitLocked(e, o.rtt)
	}
	if pe != nil {
		countModels(t.pendingPerModel, pe.Announce, -1)
		countModels(t.pendingPerModel, a, 1)
		pe.Announce, pe.Received, pe.Expires = a, recv, e.Expires
		return false
	}
	if !t.roomPendingLocked(o.via, o.viaIP) {
		return false
	}
	t.addPendingLocked(&pendingEntry{Entry: e, via: o.via, viaIP: o.viaIP, nextProbe: recv})
	return false
}

// admitLocked moves e into the visible table, out of quarantine, if the
// table and e's IP have room, and one of its models has room or a clearly
// worse worker of one of them to replace (rtt: e's, 0 unknown). Our own
// entry always fits: the router must be able to use itself.
func (t *PeerTable) admitLocked(e Entry, rtt time.Duration) bool {
	var replace peer.ID
	if !e.Self {
		if len(t.entries) >= t.max {
			if !t.full {
				t.full = true
				log.Warnw("peer table is full; ignoring announcements from new peers", "max", t.max)
			}
			return false
		}
		if perIPBounded(e.IP) && t.perIP[e.IP] >= t.lim.perIP {
			log.Debugw("too many peers from one IP; peer stays in quarantine", "peer", e.Peer, "ip", e.IP, "max", t.lim.perIP)
			return false
		}
		if !t.roomModelLocked(e.Announce, false) {
			if replace = t.replaceableLocked(e.Announce, rtt, t.now(), e.Peer); replace == "" {
				log.Debugw("enough workers of its models kept, none clearly worse; peer not taken", "peer", e.Peer, "max", t.lim.perModel)
				return false
			}
		}
	}
	if replace != "" {
		log.Debugw("kept worker replaced by a clearly better one", "peer", replace, "by", e.Peer)
		t.removeLocked(replace, ReasonReplaced)
	}
	t.dropPendingLocked(e.Peer)
	if perIPBounded(e.IP) {
		t.perIP[e.IP]++
	}
	if !e.Self {
		countModels(t.perModel, e.Announce, 1)
	}
	t.entries[e.Peer] = &e
	t.indexLocked(e.Peer, e.Announce, true)
	t.emitLocked(Event{Kind: Join, Peer: e.Peer})
	return true
}

// keepsChangedLocked reports whether kept worker e may go on with its
// new announcement a (e's counts already taken out). A change of the
// models counted under the bound is judged as a newcomer's announcement
// would be: room for one of them, or a clearly worse worker to replace
// (which is removed). Otherwise an author taken for a model with room
// could move to a model at its bound and free its room for the next:
// the bound would not hold. Announcements that keep their models are
// not judged again, so that workers taken in turn do not churn.
func (t *PeerTable) keepsChangedLocked(e *Entry, a *pb.Announce) bool {
	if t.lim.perModel <= 0 || t.sameCountedKeysLocked(e.Announce, a) || t.roomModelLocked(a, false) {
		return true
	}
	replace := t.replaceableLocked(a, e.RTT, t.now(), e.Peer)
	if replace == "" {
		return false
	}
	log.Debugw("kept worker replaced by a clearly better one", "peer", replace, "by", e.Peer)
	t.removeLocked(replace, ReasonReplaced)
	return true
}

// sameCountedKeysLocked reports whether a and b count under the bound for
// the same keys.
func (t *PeerTable) sameCountedKeysLocked(a, b *pb.Announce) bool {
	for k := range boundKeys(a) {
		if t.countedLocked(k) && !hasKey(b, k) {
			return false
		}
	}
	for k := range boundKeys(b) {
		if t.countedLocked(k) && !hasKey(a, k) {
			return false
		}
	}
	return true
}

func (t *PeerTable) roomPendingLocked(via peer.ID, viaIP string) bool {
	switch {
	case len(t.pending) >= t.lim.pending:
		return false
	case t.perVia[via] >= t.lim.perForwarder:
		return false
	case viaIP != "" && t.perViaIP[viaIP] >= t.lim.perForwarder:
		return false
	}
	return true
}

// roomModelLocked reports whether one of a's bound keys (its models, the
// relay role) has fewer than the per-model bound of peers kept (and, with
// pending, quarantined). An announcement of neither is not bounded here.
func (t *PeerTable) roomModelLocked(a *pb.Announce, pending bool) bool {
	if t.lim.perModel <= 0 {
		return true
	}
	bounded := false
	for k := range boundKeys(a) {
		bounded = true
		if !t.countedLocked(k) {
			continue
		}
		n := t.perModel[k]
		if pending {
			n += t.pendingPerModel[k]
		}
		if n < t.lim.perModel {
			return true
		}
	}
	return !bounded
}

// replaceableLocked returns the kept worker that a new author announcing a
// (rtt: its RTT, 0 unknown) is to replace, "" if none. For each model of
// a, the candidates are the kept workers of that model whose eviction
// leaves each of their models at its bound at least (counting the
// newcomer): a worker that would be taken again for another model's room
// is no candidate, nor the only worker of a model. Among them, the one a
// is clearly better than by the most (protocol.ClearlyBetter on the
// router's score from what the announcements say) is replaced: the margin
// keeps near-equal workers from taking turns. The author itself (by) is
// no candidate.
func (t *PeerTable) replaceableLocked(a *pb.Announce, rtt time.Duration, now time.Time, by peer.ID) peer.ID {
	if t.lim.perModel <= 0 || a.GetDraining() {
		return ""
	}
	var worst peer.ID
	worstRatio := 0.0
	for _, mi := range a.GetModels() {
		m := mi.GetName()
		for p, e := range t.entries {
			emi := modelEntry(e.Announce, m)
			if e.Self || p == by || emi == nil || !t.evictableLocked(e.Announce, a) {
				continue
			}
			// An RTT counts only when both are known: a newcomer not
			// pinged yet must not look near.
			mine, theirs := time.Duration(0), time.Duration(0)
			if rtt > 0 && e.RTT > 0 {
				mine, theirs = rtt, e.RTT
			}
			ms := protocol.AnnouncedEstimate(a, mi, mine).Score()
			ts := math.Inf(1)
			if e.Expires.After(now) && !e.Announce.GetDraining() && !e.unusableUntil.After(now) {
				// What the router measured of a kept worker overrides
				// what it announces, as in the router's own score: a
				// worker that claims more speed than it gives is judged
				// on what it gives.
				est := protocol.AnnouncedEstimate(e.Announce, emi, theirs)
				if e.measuredTTFTMs > 0 {
					est.TTFTMs = e.measuredTTFTMs
				}
				ts = est.Score()
			}
			if !protocol.ClearlyBetter(ms, ts) {
				continue
			}
			r := ts / ms
			if r > worstRatio || (r == worstRatio && p < worst) {
				worst, worstRatio = p, r
			}
		}
	}
	return worst
}

// evictableLocked reports whether removing the kept worker announcing
// old, for a newcomer announcing a, leaves every bound key of old (its
// models, the relay role) at its bound at least: otherwise old would be
// taken again at its next announcement, for the room it left.
func (t *PeerTable) evictableLocked(old, a *pb.Announce) bool {
	for k := range boundKeys(old) {
		if !t.countedLocked(k) {
			continue
		}
		n := t.perModel[k] - 1
		if hasKey(a, k) {
			n++
		}
		if n < t.lim.perModel {
			return false
		}
	}
	return true
}

// replacePendingLocked reports whether a new author announcing a may wait
// in quarantine although its models are at their bound: it would replace
// a kept worker, and one of its models has fewer than the bound waiting.
func (t *PeerTable) replacePendingLocked(a *pb.Announce, rtt time.Duration) bool {
	if t.replaceableLocked(a, rtt, t.now(), "") == "" {
		return false
	}
	for _, m := range a.GetModels() {
		if t.pendingPerModel[m.GetName()] < t.lim.perModel {
			return true
		}
	}
	return false
}

// modelEntry is a's first entry for model, nil if it does not serve it.
func modelEntry(a *pb.Announce, model string) *pb.ModelInfo {
	for _, mi := range a.GetModels() {
		if mi.GetName() == model {
			return mi
		}
	}
	return nil
}

// markUnusable records that the router found ps unusable: until until,
// each is the first of its models to be replaced by a newcomer.
func (t *PeerTable) markUnusable(ps []peer.ID, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range ps {
		if e, ok := t.entries[p]; ok {
			e.unusableUntil = until
		}
	}
}

// setMeasured records the router's smoothed TTFT of kept peer p.
func (t *PeerTable) setMeasured(p peer.ID, ttftMs float64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.entries[p]; ok {
		e.measuredTTFTMs = ttftMs
	}
}

// keptOf returns the peers kept that announce model.
func (t *PeerTable) keptOf(model string) map[peer.ID]bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[peer.ID]bool, len(t.byModel[model]))
	for p := range t.byModel[model] {
		out[p] = true
	}
	return out
}

// relayKey stands for the relay role among the keys the per-model bound
// counts (no model name is empty). A relay is kept for its role: the
// relay keeper of a node without the swarm view finds its relays in the
// table, so a relay that also serves a model at its bound must not be
// left out of it or replaced by a faster worker of that model. Relays
// are bounded as a model is.
const relayKey = ""

// boundKeys are the keys under the per-model bound that a counts in: the
// models it announces, and relayKey when it announces the relay role.
func boundKeys(a *pb.Announce) iter.Seq[string] {
	return func(yield func(string) bool) {
		for _, m := range a.GetModels() {
			if !yield(m.GetName()) {
				return
			}
		}
		if slices.Contains(a.GetRoles(), "relay") {
			yield(relayKey)
		}
	}
}

// countedLocked reports whether the per-model bound counts key: the relay
// role always, a model when this node watches it (or watches every one).
func (t *PeerTable) countedLocked(key string) bool {
	if key == relayKey || !t.watchOnly {
		return true
	}
	_, ok := t.watched[key]
	return ok
}

// setWatched records whether this node reads model's topic now.
func (t *PeerTable) setWatched(model string, on bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if on {
		t.watched[model] = struct{}{}
	} else {
		delete(t.watched, model)
	}
}

// hasKey reports whether k is one of a's bound keys.
func hasKey(a *pb.Announce, k string) bool {
	if k == relayKey {
		return slices.Contains(a.GetRoles(), "relay")
	}
	return modelEntry(a, k) != nil
}

// countModels adds delta to the count of each bound key of a.
func countModels(counts map[string]int, a *pb.Announce, delta int) {
	for n := range boundKeys(a) {
		if counts[n] += delta; counts[n] <= 0 {
			delete(counts, n)
		}
	}
}

func (t *PeerTable) addPendingLocked(pe *pendingEntry) {
	countModels(t.pendingPerModel, pe.Announce, 1)
	t.pending[pe.Peer] = pe
	t.perVia[pe.via]++
	if pe.viaIP != "" {
		t.perViaIP[pe.viaIP]++
	}
	select {
	case t.wake <- struct{}{}:
	default:
	}
}

func (t *PeerTable) dropPendingLocked(p peer.ID) {
	pe, ok := t.pending[p]
	if !ok {
		return
	}
	delete(t.pending, p)
	countModels(t.pendingPerModel, pe.Announce, -1)
	if t.perVia[pe.via]--; t.perVia[pe.via] <= 0 {
		delete(t.perVia, pe.via)
	}
	if pe.viaIP != "" {
		if t.perViaIP[pe.viaIP]--; t.perViaIP[pe.viaIP] <= 0 {
			delete(t.perViaIP, pe.viaIP)
		}
	}
}

// wouldTake reports whether announcement a of author delivered by via
// would be kept: known authors always, proven ones if one of their models
// has room or they would replace a kept worker, a new one only if
// quarantine has room for via and, likewise, one of its models has room
// or it would replace one. The validator ignores (does not forward) what the table
// would drop, so a flood stops at the first honest node, and a node that
// keeps K workers of a model neither probes nor relays the others. A
// known author's update goes through even when it moves the author to
// models without room (keepsChangedLocked): the table must see it to drop
// the author, whose old announcement would otherwise stand; it is then
// no longer known, so this costs one forward per such move.
func (t *PeerTable) wouldTake(author peer.ID, o origin, a *pb.Announce) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if author == t.self {
		return true
	}
	if _, ok := t.entries[author]; ok {
		return true
	}
	if _, ok := t.pending[author]; ok {
		return true
	}
	if !t.roomModelLocked(a, true) && !t.replacePendingLocked(a, o.rtt) {
		return false
	}
	if o.proven {
		return true
	}
	if pr, ok := t.proven[author]; ok && t.now().Sub(pr.at) < provenTTL {
		return true
	}
	return t.roomPendingLocked(o.via, o.viaIP)
}

// prove records that p is connected to us over ip, and admits its
// quarantined announcement if it has one.
func (t *PeerTable) prove(p peer.ID, ip string) bool {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed || p == t.self {
		return false
	}
	if _, ok := t.proven[p]; !ok && len(t.proven) >= t.max {
		t.forgetProofsLocked(now)
	}
	t.proven[p] = proof{ip: ip, at: now}
	pe, ok := t.pending[p]
	if !ok {
		return false
	}
	if !pe.Expires.After(now) {
		t.dropPendingLocked(p)
		return false
	}
	if t.allow != nil && !t.allow(p, pe.Announce) {
		log.Debugw("announcement beyond the author's roles dropped", "peer", p)
		t.dropPendingLocked(p)
		return false
	}
	e := pe.Entry
	e.IP = ip
	if !t.admitLocked(e, 0) {
		// Over the limits for its IP: probe again later.
		pe.nextProbe = now.Add(maxProbeBackoff)
		return false
	}
	return true
}

// forgetProofsLocked makes room among the proofs: the expired ones, and
// if none, those of peers not in the table.
func (t *PeerTable) forgetProofsLocked(now time.Time) {
	for p, pr := range t.proven {
		if now.Sub(pr.at) >= provenTTL {
			delete(t.proven, p)
		}
	}
	if len(t.proven) < t.max {
		return
	}
	for p := range t.proven {
		if _, ok := t.entries[p]; !ok {
			delete(t.proven, p)
		}
	}
}

// Probe back-off of a quarantined peer: 1 s doubling to 1 min.
const (
	minProbeBackoff = time.Second
	maxProbeBackoff = time.Minute
)

// dueProbes returns up to n quarantined peers whose next probe is due,
// with the addresses they announced, and schedules their next probe.
func (t *PeerTable) dueProbes(n int) []Entry {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Entry
	for _, pe := range t.pending {
		if len(out) == n {
			break
		}
		if pe.nextProbe.After(now) || !pe.Expires.After(now) {
			continue
		}
		pe.nextProbe = now.Add(min(minProbeBackoff<<min(pe.probes, 6), maxProbeBackoff))
		pe.probes++
		out = append(out, pe.Entry)
	}
	return out
}

// Quarantined is the number of announcing peers in quarantine: known from
// gossip only, not yet proven reachable, not routed to.
func (t *PeerTable) Quarantined() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending)
}

// remove drops p's entry, emitting Leave with reason, and reports whether
// there was one.
func (t *PeerTable) remove(p peer.ID, reason string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.removeLocked(p, reason)
}

func (t *PeerTable) removeLocked(p peer.ID, reason string) bool {
	e, ok := t.entries[p]
	if !ok {
		return false
	}
	delete(t.entries, p)
	t.indexLocked(p, e.Announce, false)
	if !e.Self {
		countModels(t.perModel, e.Announce, -1)
	}
	if perIPBounded(e.IP) {
		if t.perIP[e.IP]--; t.perIP[e.IP] <= 0 {
			delete(t.perIP, e.IP)
		}
	}
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
	for p, pe := range t.pending {
		if !pe.Expires.After(now) {
			t.dropPendingLocked(p)
		}
	}
	return n
}

// setRTT records a ping sample for p, if p is still in the table: an EWMA
// of the samples on one path. A sample on another path than the last
// (direct after relayed, after a hole punch; relayed after the direct
// connection died) starts over, so the RTT is that of the path queries
// take now, not a blend of a relay's detour and the direct route.
func (t *PeerTable) setRTT(p peer.ID, sample time.Duration, relayed bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[p]
	if !ok {
		return
	}
	if e.RTT == 0 || e.RTTRelayed != relayed {
		e.RTT, e.RTTRelayed = sample, relayed
		return
	}
	e.RTT = (e.RTT*(rttSmoothing-1) + sample) / rttSmoothing
}

// rttSmoothing: each sample weighs 1/rttSmoothing in the RTT's EWMA.
const rttSmoothing = 4

// close ends every subscription; later changes are refused.
func (t *PeerTable) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.closed = true
	clear(t.pending)
	for s := range t.subs {
		close(s.ch)
		delete(t.subs, s)
	}
}
