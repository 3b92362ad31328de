// Package router sends each query to the best-scoring capable worker,
// streams its events back, and fails over to the next candidate when a
// worker is busy, unreachable or fails before its first output.
package router

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"
	"golang.org/x/sync/singleflight"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/node/liveness"
	"github.com/mtor-swarm/mtor/node/relayaddr"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/router")

// Defaults.
const (
	DefaultDeadline = 120 * time.Second
	// DefaultMaxAttempts bounds the failures of peers one query may meet.
	DefaultMaxAttempts = 4
	DialTimeout        = 10 * time.Second
	// AcceptTimeout bounds the wait for a worker's first frame (Accepted),
	// which a live worker sends as soon as it has read the request. Once
	// it has accepted, the bound is 2.5 of the heartbeats it declared.
	AcceptTimeout = 2500 * time.Millisecond
	// DefaultRetryBase is the first back-off after a peer failed a query.
	DefaultRetryBase = 50 * time.Millisecond
	// providerWait bounds the DHT look-up of a model the table has no
	// worker of; providerWaitListed, of one the swarm's catalogue lists
	// (its workers exist: the first may be joining over a slow link).
	providerWait       = 5 * time.Second
	providerWaitListed = 15 * time.Second
	// InFlightTag is the connection manager's tag under which the router
	// protects the connections of a peer while it has queries in flight
	// there.
	InFlightTag = "mtor-query"
	// DefaultMaxOutput bounds the output of one query (text, media and
	// embeddings, in bytes): a worker sending more is flooding.
	DefaultMaxOutput = 32 << 20
	// Stall bounds: a worker that accepted a query and heartbeats but
	// makes no progress (no output, no step forward in its queue) for
	// 10 × its expected TTFT, within these bounds, is stalling.
	minStall      = 10 * time.Second
	maxStall      = 60 * time.Second
	maxMediaStall = 5 * time.Minute // an image or a transcription comes whole
	// queueStalls bounds, in stall periods, how long steps forward in a
	// worker's queue alone hold a query when another worker could take it
	// now: a liar announcing thousands of slots could otherwise count
	// them down, a step a period, to the query's deadline; and a query
	// waiting that long in one queue is better served by a free worker.
	queueStalls = 3
	// heldFirst is how long a worker whose queue held a query past
	// queueStalls (failQueued) ranks after every free worker (but before
	// full ones).
	// Each hold in a row doubles it, to heldMost; an answer ends the
	// row. A queue that slow will hold the next query too, and a worker
	// that counts a queue down within what it announced (which
	// queueLie cannot blame) delays one query per period, not each.
	heldFirst = time.Minute
	heldMost  = 16 * time.Minute
	// maxModelTrackers bounds the per-model health kept of one peer.
	maxModelTrackers = 64
	// pruneEvery spaces the pruning of the state of peers gone from the
	// table (prune).
	pruneEvery = 10 * time.Second
)

// Candidate is a worker known from the peer table.
type Candidate struct {
	Peer     peer.ID
	Announce *pb.Announce
	RTT      time.Duration
	// RTTRelayed: RTT was measured through a relay, which it includes.
	RTTRelayed bool
	Received   time.Time
}

// Table lists the workers the router may use.
type Table interface {
	Candidates() []Candidate
}

// ModelTable is a Table that also lists one model's candidates alone. A
// node with the swarm view holds every worker of every model, and each
// routing decision needs one model's: without it, every query copies
// the whole table.
type ModelTable interface {
	Table
	ModelCandidates(model string) []Candidate
}

// candidates are the table's candidates that may serve model: only
// those when the table can tell, else all.
func (r *Router) candidates(model string) []Candidate {
	if mt, ok := r.table.(ModelTable); ok {
		return mt.ModelCandidates(model)
	}
	return r.table.Candidates()
}

// Providers finds workers of a model in the DHT when the table has none.
// It may return none because the table has since learnt some, which the
// router then reads.
type Providers interface {
	FindProviders(ctx context.Context, model string, limit int) ([]peer.AddrInfo, error)
}

// Seeker looks for more workers of a model when those the table keeps
// cannot serve it: all draining, failing, busy or full
// (discovery.Discovery.SeekWorkers, on a node that keeps a bounded number
// of workers per model). unusable names the peers this router found
// failing or busy. It must not block.
type Seeker interface {
	SeekWorkers(model string, unusable []peer.ID)
}

// Measurer is told what this router measured of a worker: its smoothed
// time to first token, in ms, after each answer that had one
// (discovery.Discovery.Measured, whose bounded table then judges the
// worker on it). It must not block.
type Measurer interface {
	Measured(p peer.ID, ttftMs float64)
}

// PeerFinder finds the addresses of a peer (the DHT does), for workers
// known from gossip that this node has never been connected to.
type PeerFinder interface {
	FindPeer(ctx context.Context, p peer.ID) (peer.AddrInfo, error)
}

// Local is this node's own worker, called without a network hop.
type Local interface {
	Serve(ctx context.Context, req *pb.QueryRequest, emit func(*pb.Event) error) (*pb.Done, error)
}

// Suspecter checks a connection that a query found silent, and closes it
// if its peer is gone (liveness.Checker).
type Suspecter interface {
	Suspect(network.Conn)
	// Check is Suspect, then done with what the probe says of the
	// process at the other end (never before Check returns).
	Check(conn network.Conn, done func(liveness.Outcome))
	// Dead reports whether it closed conn because its peer was gone.
	Dead(network.Conn) bool
}

// peerState is what this router has observed of one worker.
type peerState struct {
	incarnation uint64 // of the process these figures are about
	// seen is when the latest of its announcements that this router
	// ranked came (Candidate.Received).
	seen time.Time
	// forgiving: a new incarnation or new addresses asked to clear its
	// breaker (forgiveBreaker) or its hold (forgiveHold), and the verdict
	// on its old connections is due (forgiveLocked).
	forgiving, forgiveBreaker, forgiveHold bool
	// refutedUntil: a connection from before such a claim answered, so
	// until then its claims clear nothing.
	refutedUntil time.Time
	// restartSeen is what seen was when the peer last claimed a restart:
	// a failure of a query its old process held, recorded after the
	// claim, is tested on the same connections (oldFailureLocked).
	restartSeen time.Time
	// failConn is the connection it last failed on (a peer's own failure,
	// recordLocked): a claim of a fresh start is tested on it too, however
	// recent. An answer ends it.
	failConn network.Conn
	inflight int
	name     string // the peer ID in text, encoded once (Result.PeerString)
	tracker  *health.Tracker
	ttft     float64 // EWMA, ms, as seen from here (network included)
	service  float64 // EWMA, ms, total time of a query
	// A peer that could not be dialled is "not reachable yet" (behind NAT
	// before its relay reservation, say), not failing: it is left out
	// until it announces again or announces other addresses, and its
	// breaker is not touched.
	unreachableAt time.Time
	addrsKey      string // the addresses it announced, as one string
	// models holds the health of each model the peer answered errors
	// for: a worker failing one model it announces is banned from that
	// model (with back-off), not from the others.
	models map[string]*health.Tracker
	// energyProbed is when a query preferring energy last went to the
	// peer to measure a model it announces no joules per token for
	// (energy.go), by model.
	energyProbed map[string]time.Time
	// jpt is the joules per token of the peer's answers by model, EWMA,
	// from their Done: a worker announcing less than it reports in its
	// answers is ranked by the more (energy.go).
	jpt map[string]float32
	// heldUntil: its queue held a query past queueStalls, and until then
	// it ranks after the free workers (heldFirst); holds counts such
	// holds in a row.
	heldUntil time.Time
	holds     int
}

// unreachableLocked reports whether c is still unreachable: it failed a
// dial and has not announced since.
func (st *peerState) unreachableLocked(c Candidate) bool {
	return !st.unreachableAt.IsZero() && st.unreachableAt.After(c.Received) && st.addrsKey == addrsKey(c.Announce)
}

// addrsKey is the announced address set of a, as one comparable string.
func addrsKey(a *pb.Announce) string {
	var b strings.Builder
	for _, ad := range a.GetAddrs() {
		b.Write(ad)
		b.WriteByte(0)
	}
	return b.String()
}

// model is the health of one of the peer's models, nil if never failed.
func (st *peerState) model(name string) *health.Tracker { return st.models[name] }

// Router routes queries. It is safe for concurrent use.
type Router struct {
	// waitedOn counts the stall periods waited on a worker no other
	// could replace (for tests: each is one period, never a spin).
	waitedOn atomic.Int64

	h           host.Host
	proto       libp2pproto.ID
	table       Table
	providers   Providers
	seeker      Seeker
	measurer    Measurer
	finder      PeerFinder
	local       Local
	deadline    time.Duration
	maxAttempts int
	idle        time.Duration // fixed silence bound; 0 = from the heartbeat
	accept      time.Duration
	send        time.Duration // least bound on sending a request (protocol.RequestTimeout)
	pace        *pacer        // stream opens per worker
	dial        time.Duration
	retryBase   time.Duration
	checker     Suspecter
	punches     HolePunches
	trackerOpts []health.Option
	margin      time.Duration // restartMargin; shorter in tests
	maxOutput   int
	stall       time.Duration // fixed stall bound; 0 = from the expected TTFT
	receipts    *receipts     // nil: receipts are passed on unchecked

	catalog  Catalog                // models known without their workers; nil = none
	rep      Reputation             // honesty spot checks' verdicts; nil = all trusted
	observer func(*pb.QueryRequest) // sees each routed query

	// preferEnergy and energySlack: energy.go.
	preferEnergy bool
	energySlack  float64

	pings singleflight.Group // answersPing's, by peer

	mu       sync.Mutex
	peers    map[peer.ID]*peerState
	prunedAt time.Time // prune's last run
	rng      *mrand.Rand
}

// HolePunches tells which direct connections a hole punch (DCUtR) made,
// for the peer views.
type HolePunches interface {
	HolePunched(c network.Conn) bool
}

// Option configures a Router.
type Option func(*Router)

// WithProviders enables DHT lookups for models missing from the table.
func WithProviders(p Providers) Option { return func(r *Router) { r.providers = p } }

// WithSeeker has the router tell s when no worker the table holds can
// serve a model, so that it finds others.
func WithSeeker(s Seeker) Option { return func(r *Router) { r.seeker = s } }

// WithMeasurer has the router tell m what it measures of each worker.
func WithMeasurer(m Measurer) Option { return func(r *Router) { r.measurer = m } }

// WithPeerFinder looks up addresses of peers it cannot reach otherwise.
func WithPeerFinder(f PeerFinder) Option { return func(r *Router) { r.finder = f } }

// WithLocal lets the router answer with this node's worker.
func WithLocal(l Local) Option { return func(r *Router) { r.local = l } }

// WithDefaultDeadline is used for queries without a deadline.
func WithDefaultDeadline(d time.Duration) Option { return func(r *Router) { r.deadline = d } }

// WithMaxAttempts bounds how many workers one query tries.
func WithMaxAttempts(n int) Option { return func(r *Router) { r.maxAttempts = n } }

// WithIdleTimeout fixes the bound on the silence between events of a
// stream, instead of three of the heartbeats the worker declares.
func WithIdleTimeout(d time.Duration) Option { return func(r *Router) { r.idle = d } }

// WithRetryBackoff sets the first back-off after a peer failed a query.
func WithRetryBackoff(d time.Duration) Option {
	return func(r *Router) {
		if d > 0 {
			r.retryBase = d
		}
	}
}

// WithHolePunches has the peer views tell direct connections made by a
// hole punch from others.
func WithHolePunches(h HolePunches) Option { return func(r *Router) { r.punches = h } }

// WithConnChecker has silent connections probed and closed if dead.
func WithConnChecker(c Suspecter) Option { return func(r *Router) { r.checker = c } }

// WithMaxOutput bounds the output bytes of one query; a worker that sends
// more (or far more chunks than max_tokens) is banned for flooding.
func WithMaxOutput(n int) Option {
	return func(r *Router) {
		if n > 0 {
			r.maxOutput = n
		}
	}
}

// WithStallTimeout fixes how long a worker that accepted a query may go
// without progress (output, or a step forward in its queue) while it
// sends heartbeats, instead of 10 × its expected TTFT (10 s to 1 min).
// Either bound applies only while another worker could take the query.
func WithStallTimeout(d time.Duration) Option { return func(r *Router) { r.stall = d } }

// WithDialTimeout bounds connecting to a worker and opening a stream.
func WithDialTimeout(d time.Duration) Option { return func(r *Router) { r.dial = d } }

// WithAcceptTimeout bounds the wait for a worker's first frame.
func WithAcceptTimeout(d time.Duration) Option { return func(r *Router) { r.accept = d } }

// WithHealthOptions configures the per-peer health trackers.
func WithHealthOptions(opts ...health.Option) Option {
	return func(r *Router) { r.trackerOpts = opts }
}

// WithSeed makes peer choice reproducible, for tests.
func WithSeed(seed uint64) Option {
	return func(r *Router) { r.rng = mrand.New(mrand.NewPCG(seed, seed)) }
}

// New builds a router that reaches workers over h with the query protocol.
func New(h host.Host, proto libp2pproto.ID, table Table, opts ...Option) *Router {
	var s [16]byte
	_, _ = rand.Read(s[:])
	r := &Router{
		h: h, proto: proto, table: table,
		deadline:    DefaultDeadline,
		maxAttempts: DefaultMaxAttempts,
		accept:      AcceptTimeout,
		send:        protocol.RequestTimeout,
		pace:        newPacer(DefaultOpensPerPeer, DefaultOpenQueuePerPeer),
		dial:        DialTimeout,
		margin:      restartMargin,
		retryBase:   DefaultRetryBase,
		maxOutput:   DefaultMaxOutput,
		peers:       map[peer.ID]*peerState{},
		rng:         mrand.New(mrand.NewPCG(binaryU64(s[:8]), binaryU64(s[8:]))),
	}
	for _, o := range opts {
		o(r)
	}
	return r
}

func binaryU64(b []byte) uint64 {
	var v uint64
	for _, x := range b {
		v = v<<8 | uint64(x)
	}
	return v
}

func (r *Router) state(p peer.ID) *peerState {
	st := r.peers[p]
	if st == nil {
		st = &peerState{tracker: health.New(r.trackerOpts...)}
		r.peers[p] = st
	}
	return st
}

// scored is a candidate with its expected time to first token.
type scored struct {
	Candidate
	score float64
	full  bool // no free slot: a query would queue behind unknown work
	// held: its queue held a query lately (heldFirst); ranked with the
	// full ones, but a stalled query may still move to it (others).
	held bool
	// lastResort: its breaker for the model is open, and no other peer
	// is left (ranking.lastResort): tried past that breaker.
	lastResort bool
	// alive: it fell silent on the query, then answered a ping
	// (silentButAlive): asked again past its breaker, which the same
	// silence on its other streams may have opened (a link dark for a
	// moment fails every stream on it at once).
	alive bool
}

// last reports whether c goes after the free workers: full, or held.
func (c scored) last() bool { return c.tier() > 0 }

// tier orders candidates: free workers, then held ones (slots free, a
// slow queue lately), then full ones.
func (c scored) tier() int {
	switch {
	case c.full:
		return 2
	case c.held:
		return 1
	}
	return 0
}

// modelInfo finds the announced model entry serving t.
func modelInfo(a *pb.Announce, model string, t pb.QueryType) *pb.ModelInfo {
	for _, m := range a.GetModels() {
		if m.GetName() == model && slices.Contains(m.GetTypes(), t) {
			return m
		}
	}
	return nil
}

// rank scores every capable, available candidate, best first.
func (r *Router) rank(model string, t pb.QueryType) (ranked []scored, known bool) {
	rk := r.rankNeed(model, t, nil)
	return rk.ranked, rk.known
}

// ranking is rankNeed's answer: the candidates best first, and why others
// were left out.
type ranking struct {
	ranked []scored
	// known: some peer announces the model for the type at all.
	known bool
	// lacking: a capable peer was left out for want of a needed feature.
	lacking bool
	// unreachable counts capable peers left out as not reachable yet.
	unreachable int
	// unusable lists the capable peers left out as failing, not
	// reachable or distrusted, for the Seeker.
	unusable []peer.ID
	// lastResort are the capable peers left out only because their
	// breaker for this model is open (errors their backend reported),
	// ranked: tried when no other peer is left. Errors a query's own
	// content causes (a prompt that makes the model server fail) open
	// that breaker too, and must not shut everyone out of the model.
	lastResort []scored
}

// rankFor ranks req's candidates: an error when the model's workers are
// known but none announces every feature of need.
func (r *Router) rankFor(req *pb.QueryRequest, need []string) (ranking, error) {
	rk := r.rankNeed(req.GetModel(), req.GetType(), need)
	if len(rk.ranked) == 0 && len(rk.lastResort) == 0 && rk.lacking {
		return rk, featureError(req.GetModel(), need)
	}
	return rk, nil
}

// rankNeed is rank among the candidates whose model announces every
// feature of need.
func (r *Router) rankNeed(model string, t pb.QueryType, need []string) (rk ranking) {
	r.prune()
	cands := r.candidates(model)
	r.mu.Lock()
	defer r.mu.Unlock()
	// A peer not measured yet is assumed as fast as the measured ones on
	// average, so that it gets tried instead of losing to them for ever.
	var prior measures
	now := time.Now()
	for _, c := range cands {
		if st := r.peers[c.Peer]; st != nil {
			prior.add(st.ttft, st.service)
		}
	}
	for _, c := range cands {
		mi := modelInfo(c.Announce, model, t)
		if mi == nil {
			continue
		}
		rk.known = true
		if !hasFeatures(mi, need) {
			rk.lacking = true
			continue
		}
		if c.Announce.GetDraining() {
			continue
		}
		st := r.state(c.Peer)
		r.noteChangesLocked(c, st)
		if st.unreachableLocked(c) {
			rk.unreachable++
			rk.unusable = append(rk.unusable, c.Peer)
			continue
		}
		if mt := st.model(model); !st.tracker.Available() || (mt != nil && !mt.Available()) || r.distrusted(c.Peer) {
			rk.unusable = append(rk.unusable, c.Peer)
			if st.tracker.Available() && !r.distrusted(c.Peer) {
				rk.lastResort = append(rk.lastResort, scored{Candidate: c, score: r.score(c, mi, st, prior), full: full(c, st), held: now.Before(st.heldUntil), lastResort: true})
			}
			continue
		}
		rk.ranked = append(rk.ranked, scored{Candidate: c, score: r.score(c, mi, st, prior), full: full(c, st), held: now.Before(st.heldUntil)})
	}
	byRank(rk.ranked)
	byRank(rk.lastResort)
	return rk
}

// byRank sorts candidates best first. A peer with a free slot always
// comes before a full one: how long a queue takes depends on work we
// cannot see (a long answer in front).
func byRank(c []scored) {
	sort.Slice(c, func(i, j int) bool {
		if c[i].tier() != c[j].tier() {
			return c[i].tier() < c[j].tier()
		}
		return c[i].score < c[j].score
	})
}

// hasFeatures reports whether mi announces every feature of need.
func hasFeatures(mi *pb.ModelInfo, need []string) bool {
	for _, f := range need {
		if !slices.Contains(mi.GetFeatures(), f) {
			return false
		}
	}
	return true
}

// FeatureError is the refusal of a query that needs model features (tools,
// JSON output, logprobs) no peer serving its model announces. It unwraps
// to an UNSUPPORTED *protocol.Error.
type FeatureError struct {
	Model    string
	Features []string // what the query needs
	err      *protocol.Error
}

func (e *FeatureError) Error() string { return e.err.Error() }
func (e *FeatureError) Unwrap() error { return e.err }

func featureError(model string, need []string) *FeatureError {
	return &FeatureError{Model: model, Features: need, err: protocol.Errorf(protocol.CodeUnsupported,
		"no peer serving model %q supports %s", model, strings.Join(need, " and "))}
}

// noteChangesLocked notes what c, the latest announcement of st's peer
// that this router ranks, changes: a new incarnation (a restart) or new
// addresses each make a fresh start, and clear the peer's failures once
// its old connections prove it (forgiveLocked).
func (r *Router) noteChangesLocked(c Candidate, st *peerState) {
	seen := st.seen
	if c.Received.After(st.seen) {
		st.seen = c.Received
	}
	restarted := r.noteIncarnationLocked(c, st)
	moved := r.noteAddrsLocked(c, st)
	if restarted {
		st.restartSeen = seen
	}
	if restarted || moved {
		r.forgiveLocked(c.Peer, st, seen, restarted)
	}
}

// noteAddrsLocked starts afresh with a peer that announces new addresses
// (after the first it announced): it may be reached now where it was
// not, so its unreachable mark and dial back-off go. It reports whether
// the addresses changed.
func (r *Router) noteAddrsLocked(c Candidate, st *peerState) bool {
	key := addrsKey(c.Announce)
	if key == st.addrsKey {
		return false
	}
	changed := st.addrsKey != ""
	st.addrsKey = key
	if !changed {
		return false
	}
	st.unreachableAt = time.Time{}
	r.clearBackoff(c.Peer)
	return true
}

// noteIncarnationLocked starts afresh with a peer that restarted: the
// figures and dial back-off of its old process say nothing of the new
// one (nor its failures, once the restart is proven: forgiveLocked), and
// connections opened to the old process are dead, though libp2p may
// still prefer them. It reports whether the peer restarted.
func (r *Router) noteIncarnationLocked(c Candidate, st *peerState) bool {
	inc := c.Announce.GetIncarnation()
	if inc == 0 || inc == st.incarnation {
		return false
	}
	restarted := st.incarnation != 0
	st.incarnation = inc
	if !restarted {
		return false
	}
	st.ttft, st.service = 0, 0
	st.energyProbed = nil // the new process has measured nothing
	r.clearBackoff(c.Peer)
	if r.checker != nil {
		for _, conn := range r.h.Network().ConnsToPeer(c.Peer) {
			r.checker.Suspect(conn)
		}
	}
	log.Debugw("peer restarted", "peer", c.Peer)
	return true
}

// restartMargin: a connection opened this long before the peer's
// previous announcement arrived is one its old process (or its old
// network) held, not its successor's: an announcement crosses the swarm
// in well under a second, and a new process needs about that to start.
const restartMargin = 5 * time.Second

// refuteFor is how long the claims of a peer caught claiming a fresh
// start it never made clear nothing.
const refuteFor = 10 * time.Minute

// forgiveLocked clears a peer's failures after a fresh start (restarted:
// a new incarnation; else new addresses), once the fresh start is proven:
// its breaker (on new addresses only when open) and, on a restart, its
// hold (its queue is new; a row of holds still counts). seen is when its
// announcement before this one came.
//
// A restarted process (incarnation is random per process start) cannot
// answer on a connection its predecessor held, nor a peer that moved on
// one of its old network's. So the connections the peer held well
// before seen, and the one it last failed on, are probed (the connection
// checker, which closes those that do not answer), and the failures are
// cleared only if nothing answers on them. A SIGKILLed process's QUIC
// connection lingers silent and is found dead within the probe's
// timeout; a TCP connection closes with its process, and with none left
// the failures go at once. A peer that claims a fresh start to clear its
// breaker, and is heard there (an echo, or its refusal of the ping),
// keeps its failures; one that claims a restart and is heard on a
// connection from well before its previous announcement is lying, and
// its claims clear nothing for refuteFor (new addresses may be honest
// while the old ones still work: a relayed address gained, a port
// mapped). A probe that cannot run (this node's own limits) is tried
// twice more, a second apart; then the failures stand. What this cannot
// see is a peer that drops its connections to this node before each
// claim, and comes back on a new one.
func (r *Router) forgiveLocked(p peer.ID, st *peerState, seen time.Time, restarted bool) {
	st.forgiveBreaker = st.forgiveBreaker || !st.tracker.Clean() && (restarted || !st.tracker.Available())
	st.forgiveHold = st.forgiveHold || restarted && time.Now().Before(st.heldUntil)
	switch {
	case !st.forgiveBreaker && !st.forgiveHold:
		return // nothing to forgive
	case time.Now().Before(st.refutedUntil):
		st.forgiveBreaker, st.forgiveHold = false, false
		return
	case st.forgiving:
		return // a verdict is due already: one at a time per peer
	}
	// The connections from before the claim: those held well before the
	// previous announcement, then the one it failed on (which may be a
	// new process's, if it failed before its announcement was ranked: an
	// answer there keeps the failures but proves no lie).
	var old []network.Conn
	for _, conn := range r.h.Network().ConnsToPeer(p) {
		if conn.Stat().Opened.Before(seen.Add(-r.margin)) {
			old = append(old, conn)
		}
	}
	margin := len(old)
	if fc := st.failConn; fc != nil && !fc.IsClosed() && !slices.Contains(old, fc) {
		old = append(old, fc)
	}
	if len(old) == 0 || r.checker == nil {
		r.forgiveNowLocked(st)
		return
	}
	st.forgiving = true
	failedOn := st.failConn
	go func() {
		var heard []liveness.Outcome
		for try := 0; try < 3; try++ {
			if try > 0 {
				time.Sleep(time.Second)
			}
			if heard = r.heard(old); !slices.Contains(heard, liveness.Unknown) || slices.Contains(heard, liveness.Alive) {
				break
			}
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.peers[p] != st {
			return // forgotten meanwhile
		}
		st.forgiving = false
		switch {
		case slices.Contains(heard[:margin], liveness.Alive) && restarted:
			// A process that says it is new answered where its
			// predecessor was: a lie (an address change may be honest:
			// a relayed address gained, a port mapped).
			st.refutedUntil = time.Now().Add(refuteFor)
			log.Infow("a peer announced a restart, but answers on a connection from before: its failures stand", "peer", p)
		case slices.Contains(heard, liveness.Alive), slices.Contains(heard, liveness.Unknown):
			log.Debugw("a peer's fresh start is not proven: its failures stand", "peer", p, "outcomes", heard)
		case st.failConn != failedOn && st.failConn != nil && !st.failConn.IsClosed() && !slices.Contains(old, st.failConn):
			// It failed again meanwhile, on a connection not probed
			// yet: that one is probed before anything is cleared.
			r.forgiveLocked(p, st, seen, restarted)
			return
		default:
			r.forgiveNowLocked(st)
			return
		}
		st.forgiveBreaker, st.forgiveHold = false, false
	}()
}

// oldFailureLocked: a query that p's process of incarnation inc held
// failed (recordLocked) after p claimed a restart (a QUIC connection of
// a killed process is found dead seconds after its successor announced
// itself). The failure is its old process's: it is cleared as the
// claim's own were, once nothing answers on the old connections
// (forgiveLocked).
func (r *Router) oldFailureLocked(p peer.ID, st *peerState, inc uint64) {
	if inc != 0 && st.incarnation != 0 && inc != st.incarnation {
		r.forgiveLocked(p, st, st.restartSeen, true)
	}
}

// heard probes conns and says what each probe heard (liveness.Check).
func (r *Router) heard(conns []network.Conn) []liveness.Outcome {
	type result struct {
		i int
		o liveness.Outcome
	}
	got := make(chan result, len(conns))
	for i, conn := range conns {
		r.checker.Check(conn, func(o liveness.Outcome) { got <- result{i, o} })
	}
	out := make([]liveness.Outcome, len(conns))
	for range conns {
		res := <-got
		out[res.i] = res.o
	}
	return out
}

// forgiveNowLocked clears what forgiveLocked was asked to.
func (r *Router) forgiveNowLocked(st *peerState) {
	st.failConn = nil
	if st.forgiveBreaker {
		st.tracker = health.New(r.trackerOpts...)
	}
	if st.forgiveHold {
		st.heldUntil = time.Time{}
	}
	st.forgiveBreaker, st.forgiveHold = false, false
}

// score is the expected time to first token in ms, divided by health and
// by reputation (honesty spot checks, reputation.go): a
// queue wait from load and concurrency, the measured TTFT, and the RTT.
// full reports whether c has no free slot, by its announcement or by the
// queries this router has in flight there.
func full(c Candidate, st *peerState) bool {
	l := c.Announce.GetLoad()
	occ := max(int(l.GetInFlight()+l.GetQueued()), st.inflight)
	return occ >= int(max(l.GetMaxConcurrency(), 1))
}

// measures averages the measured TTFT and service time of peers.
type measures struct {
	ttft, svc   float64
	nTTFT, nSvc int
}

func (m *measures) add(ttft, svc float64) {
	if ttft > 0 {
		m.ttft += ttft
		m.nTTFT++
	}
	if svc > 0 {
		m.svc += svc
		m.nSvc++
	}
}

func (m measures) meanTTFT() float64 {
	if m.nTTFT == 0 {
		return 0
	}
	return m.ttft / float64(m.nTTFT)
}

func (m measures) meanSvc() float64 {
	if m.nSvc == 0 {
		return 0
	}
	return m.svc / float64(m.nSvc)
}

// prune forgets peers that left the table and have nothing in flight, so
// the state map stays bounded by the swarm's size. It reads the whole
// table, so it runs at most every pruneEvery, not on every decision.
func (r *Router) prune() {
	now := time.Now()
	r.mu.Lock()
	due := len(r.peers) > 16 && now.Sub(r.prunedAt) >= pruneEvery
	if due {
		r.prunedAt = now
	}
	r.mu.Unlock()
	if !due {
		return
	}
	cands := r.table.Candidates()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pruneLocked(cands)
}

// pruneLocked is prune's work, over the whole table's candidates.
func (r *Router) pruneLocked(cands []Candidate) {
	if len(r.peers) <= 2*len(cands)+16 {
		return
	}
	live := make(map[peer.ID]bool, len(cands))
	for _, c := range cands {
		live[c.Peer] = true
	}
	for p, st := range r.peers {
		if !live[p] && st.inflight == 0 {
			delete(r.peers, p)
		}
	}
}

func (r *Router) score(c Candidate, mi *pb.ModelInfo, st *peerState, prior measures) float64 {
	// What this router measured overrides what the worker announced.
	e := protocol.AnnouncedEstimate(c.Announce, mi, c.RTT)
	// Our own in-flight count is fresher than the announcement, which may
	// already include it: take the larger rather than the sum.
	e.Occupied = math.Max(e.Occupied, float64(st.inflight))
	switch {
	case st.ttft > 0:
		e.TTFTMs = st.ttft
	case mi.GetP50TtftMs() == 0 && prior.meanTTFT() > 0:
		e.TTFTMs = prior.meanTTFT()
	}
	switch {
	case st.service > 0:
		e.ServiceMs = st.service
	case prior.meanSvc() > 0:
		e.ServiceMs = prior.meanSvc()
	}
	h := math.Min(float64(c.Announce.GetHealth()), st.tracker.Score())
	if mt := st.model(mi.GetName()); mt != nil {
		h = math.Min(h, mt.Score())
	}
	e.Health = h / 100 * r.reputation(c.Peer) / 100
	return e.Score()
}

// choose picks between the two best by random choice, so that a burst of
// queries does not pile onto one peer before its load shows; a clearly
// better first choice always wins.
func (r *Router) choose(ranked []scored) int {
	// ClearlyBetter's slack keeps peers a few milliseconds apart (all
	// fast, on one LAN) in the draw even when one is twice as fast.
	if len(ranked) < 2 || ranked[1].tier() != ranked[0].tier() || protocol.ClearlyBetter(ranked[0].score, ranked[1].score) {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rng.IntN(2)
}

// NewID returns a random 16-byte query id.
func NewID() []byte {
	id := make([]byte, protocol.IDLen)
	_, _ = rand.Read(id)
	return id
}

// prepare gives req an id and a deadline when it has none, checks it, and
// bounds ctx by its deadline.
func (r *Router) prepare(ctx context.Context, req *pb.QueryRequest, start time.Time) (context.Context, context.CancelFunc, error) {
	if len(req.GetId()) == 0 {
		req.Id = NewID()
	}
	if req.GetDeadlineUnixMs() == 0 {
		req.DeadlineUnixMs = start.Add(r.deadline).UnixMilli()
	}
	if err := protocol.ValidateRequest(req); err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithDeadline(ctx, time.UnixMilli(req.GetDeadlineUnixMs()))
	return ctx, cancel, nil
}

// Query routes req and streams its events to h. See the package doc.
//
// Attempts are spent only on failures of the peers themselves (dead,
// silent, unreachable, a failing backend): a busy or shutting-down worker
// sends the query on to the next one for free, and a limit of this node
// is answered BUSY at once. Each next worker is chosen from a fresh
// ranking without the peers this query already tried (a restarted peer,
// with a new incarnation, counts as new), after a short back-off.
func (r *Router) Query(ctx context.Context, req *pb.QueryRequest, h Handler) (res *Result, qerr error) {
	start := time.Now()
	ctx, cancel, err := r.prepare(ctx, req, start)
	if err != nil {
		return nil, err
	}
	defer cancel()
	r.observe(req)

	// Only text is continued, and a constrained answer (tools, JSON) would
	// restart its constraint at the seam.
	need := protocol.RequiredFeatures(req)
	q := &query{req: req, need: need, h: h, restartable: restartable(ctx), later: countersignLater(ctx), tried: map[tryKey]bool{},
		continuable: (req.GetType() == pb.QueryType_QUERY_TYPE_CHAT || req.GetType() == pb.QueryType_QUERY_TYPE_VISION) &&
			!protocol.UsesTools(req) && req.GetResponseFormat().GetType() != "json_object" && req.GetResponseFormat().GetType() != "json_schema"}
	defer func() {
		// Nobody else did better than an empty answer: it is the answer,
		// unless a later worker's output reached the client (or was
		// taken back from it) since, or the client left.
		if qerr == nil || q.empty == nil || q.outputs != q.emptyAt || q.gone != nil || errors.Is(ctx.Err(), context.Canceled) {
			return
		}
		q.finishEmpty()
		q.empty.Attempts = q.attempts
		q.empty.TotalMs = uint32(time.Since(start).Milliseconds())
		res, qerr = q.empty, nil
	}()
	rk, err := r.rankFor(req, need)
	if err != nil {
		return nil, err
	}
	ranked, known, unreachable := rk.ranked, rk.known, rk.unreachable
	switch {
	case len(ranked) == 0 && known:
		// Workers are known but none is usable: find others.
		r.seek(req.GetModel(), rk.unusable)
	case len(ranked) > 0 && ranked[0].last():
		// Free slots come first: every worker known is full.
		r.seek(req.GetModel(), nil)
	}
	fromDHT := false
	if len(ranked) == 0 && !known && r.providers != nil {
		ranked = r.fromProviders(ctx, req.GetModel(), req.GetType())
		fromDHT = len(ranked) > 0
		if fromDHT {
			q.dht = slices.Clone(ranked) // later rankings edit ranked in place
		}
		if !fromDHT {
			// The look-up may have waited while the model's topic
			// brought its workers to the table.
			if rk, err = r.rankFor(req, need); err != nil {
				return nil, err
			}
			ranked, known, unreachable = rk.ranked, rk.known, rk.unreachable
		}
	}
	if len(ranked) == 0 && len(rk.lastResort) > 0 {
		ranked = rk.lastResort
	}
	if len(ranked) == 0 {
		if known && unreachable > 0 {
			return nil, protocol.Errorf(protocol.CodeUnavailable, "no reachable peer serves model %q for %s right now: %d worker(s) unreachable (behind NAT and not yet reachable through a relay?); retry shortly", req.GetModel(), protocol.TypeName(req.GetType()), unreachable)
		}
		if known {
			return nil, protocol.Errorf(protocol.CodeUnsupported, "no available peer serves model %q for %s right now (all draining or failing)", req.GetModel(), protocol.TypeName(req.GetType()))
		}
		if r.listed(req.GetModel(), req.GetType()) {
			// Its workers exist, yet none was found or reached in time:
			// worth asking again, unlike a model nobody serves.
			return nil, protocol.Errorf(protocol.CodeUnavailable, "the swarm's catalogue lists model %q, but none of its workers could be found yet; retry shortly", req.GetModel())
		}
		return nil, protocol.Errorf(protocol.CodeUnsupported, "no peer in the swarm serves model %q for %s", req.GetModel(), protocol.TypeName(req.GetType()))
	}

	slack := r.energySlackFor(ctx)
	var lastErr *protocol.Error
	var again *scored // tried again: its path broke, or it fell silent yet answers pings
	for first := true; ; first = false {
		if !first {
			var ok bool
			if ranked, ok = r.nextCandidates(ctx, q, ranked, fromDHT, need, again != nil); !ok {
				break
			}
			if again != nil {
				ranked = withAgain(ranked, q.usable([]scored{*again}))
				again = nil
			}
		}
		if len(ranked) == 0 || q.failures >= r.maxAttempts || ctx.Err() != nil {
			break
		}
		i := 0
		if !r.byEnergy(ranked, req.GetModel(), req.GetType(), slack) {
			i = r.choose(ranked)
		}
		c := ranked[i]
		q.tried[tryKey{c.Peer, c.Announce.GetIncarnation()}] = true
		if q.started() {
			if err := q.resume(c); err != nil {
				return nil, err
			}
		}
		q.attempts++
		res, err := r.attempt(ctx, c, q)
		if err == nil {
			res.Attempts = q.attempts
			res.Continued = q.continued
			res.Writers = slices.Clone(q.writers)
			res.TotalMs = uint32(time.Since(start).Milliseconds())
			return res, nil
		}
		if q.gone != nil {
			return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", q.gone)
		}
		lastErr = protocol.AsError(err)
		if ctx.Err() != nil {
			break
		}
		var lb localBusy
		var pf peerFailure
		var we workerError
		var sc staleConn
		var pl pathLost
		var pf0 paceFull
		switch {
		case errors.As(err, &pl) && q.pathRetries < maxPathRetries:
			q.pathRetries++
			q.avoid = pl.relay
			delete(q.tried, tryKey{c.Peer, c.Announce.GetIncarnation()})
			// Closing its last connection took the worker out of a table
			// that holds connected peers only: it is still a candidate.
			again = &c
			// A dead relay's other connections (QUIC ones vanish without a
			// reset) are being probed and closed meanwhile: a retry at once
			// could take one of them again.
			if !sleepCtx(ctx, pathRetryWait<<(q.pathRetries-1)) {
				return nil, ctxErr(ctx)
			}
		case errors.As(err, &pl):
			q.failures++
			q.lastOf(c)
			switch {
			case pl.accepted:
				q.kinds[failDied]++
			case pl.silent:
				q.kinds[failSilent]++
			default:
				q.kinds[failUnreachable]++
			}
		case errors.As(err, &sc) && q.stale < maxStaleRetries:
			q.stale++
			delete(q.tried, tryKey{c.Peer, c.Announce.GetIncarnation()})
			if c.alive {
				// Asked again past its breaker: so it is on the new
				// connection.
				again = &c
			}
		case errors.As(err, &sc):
			q.failures++
			q.lastOf(c)
			q.kinds[failDied]++
		case errors.As(err, &lb):
			// Backpressure of this node: another peer would need the
			// same local resources.
			return nil, lastErr
		case errors.As(err, &pf):
			q.failures++
			q.lastOf(c)
			q.kinds[pf.kind]++
			if r.silentButAlive(ctx, q, c, pf.kind) {
				q.silentRetries++
				q.silentKind, q.silentCounted = pf.kind, true
				delete(q.tried, tryKey{c.Peer, c.Announce.GetIncarnation()})
				c.alive = true
				again = &c
			}
		case errors.As(err, &pf0):
			// Our pacing's refusal: the worker was not asked.
			q.busy++
		case errors.As(err, &we) && (we.err.Code == protocol.CodeBusy || we.err.Code == protocol.CodeUnavailable):
			q.lastOf(c)
			q.busy++
		case errors.As(err, &we) && we.early:
			q.failures++
			q.lastOf(c)
			q.kinds[failEarlyTimeout]++
			q.earlyWhy = we.err.Message
		case errors.As(err, &we) && we.err.Code == protocol.CodeUnsupported:
			// Our table was stale (the model left that worker), or it
			// cannot continue: another candidate may still serve it.
		case lastErr.Retryable:
			q.failures++
			q.lastOf(c)
			q.kinds[failBackend]++
		default:
			return nil, lastErr
		}
		log.Debugw("trying the next candidate", "peer", c.Peer, "started", q.started(), "err", lastErr)
		if q.failures > 0 && errors.As(err, &pf) {
			if !r.backoff(ctx, q.failures) {
				break
			}
		}
	}
	if ctx.Err() != nil {
		return nil, ctxErr(ctx)
	}
	if !fromDHT {
		// Every worker tried failed or was busy: find others.
		r.seek(req.GetModel(), q.triedPeers())
	}
	if q.failures == 0 && q.busy > 0 {
		return nil, protocol.Errorf(protocol.CodeBusy, "swarm busy: %d capable peer(s) tried, all busy or shutting down", q.busy)
	}
	if fromDHT && q.onlyUnreachable() {
		// Provider records outlive their workers by up to 48 h: nobody
		// announcing the model and no provider reachable means nobody
		// serves it. A provider reached that then failed (silent over a
		// lossy link, died, busy) does serve it: that is UNAVAILABLE.
		return nil, protocol.Errorf(protocol.CodeUnsupported, "no peer in the swarm serves model %q for %s (%d provider record(s) in the DHT, none reachable)", req.GetModel(), protocol.TypeName(req.GetType()), q.attempts)
	}
	if q.peerFailures() == 0 && lastErr != nil {
		// Only backends failed (or a continuation found no taker): the
		// workers' own report says best what went wrong.
		return nil, lastErr
	}
	return nil, protocol.Errorf(protocol.CodeUnavailable, "%s", q.summary())
}

// seek tells the Seeker, if any, that the table's workers of model cannot
// serve it.
func (r *Router) seek(model string, unusable []peer.ID) {
	if r.seeker != nil {
		r.seeker.SeekWorkers(model, unusable)
	}
}

// withAgain puts the candidates of again, to be tried again, into
// ranked: in place of the same process's own entry where ranked has one
// (from a fresh ranking, or the DHT's list), which lacks what again says
// of the retry (alive), else after the others. A newer process of the
// peer, ranked afresh, stays as it is.
func withAgain(ranked, again []scored) []scored {
	for _, c := range again {
		switch i := slices.IndexFunc(ranked, func(o scored) bool { return o.Peer == c.Peer }); {
		case i < 0:
			ranked = append(ranked, c)
		case ranked[i].Announce.GetIncarnation() == c.Announce.GetIncarnation():
			ranked[i] = c
		}
	}
	return ranked
}

// When every known candidate has failed a query, it waits for a fresh
// one: maxCandidateWaits back-offs (about 0.2 to 0.35 s) after failures
// a restart does not mend (a backend's error, a protocol violation), and
// up to freshWait in all once a worker died, went silent or could not be
// reached: a worker process restarted at once (systemd's default delay
// is 100 ms) is routable about 0.6 s after its start
// (docs/benchmarks.md), and a few seconds before UNAVAILABLE cost a
// caller little next to an answer lost when its only worker crashed.
const (
	maxCandidateWaits = 3
	freshWait         = 3 * time.Second
)

// backoff waits before the n-th retry (n ≥ 1): backoffFor(n). It reports
// false if ctx ended first.
func (r *Router) backoff(ctx context.Context, n int) bool {
	return sleepCtx(ctx, r.backoffFor(n))
}

// backoffFor is the wait before the n-th retry (n ≥ 1): 50 ms doubling up
// to 800 ms, with jitter.
func (r *Router) backoffFor(n int) time.Duration {
	d := r.retryBase << min(n-1, 4)
	r.mu.Lock()
	defer r.mu.Unlock()
	return d/2 + time.Duration(r.rng.Int64N(int64(d/2)+1))
}

// nextCandidates ranks the candidates q has not tried yet (from prev when
// they came from the DHT). When every candidate failed, and no worker is
// to be tried again (retry), it waits, backing off, for a restarted
// worker to announce itself (maxCandidateWaits, freshWait), never into
// the last second before the query's deadline, which is left for the
// error to reach the caller. ok is false when ctx ended meanwhile.
func (r *Router) nextCandidates(ctx context.Context, q *query, prev []scored, fromDHT bool, need []string, retry bool) (ranked []scored, ok bool) {
	for {
		if fromDHT {
			ranked = q.untried(prev)
		} else {
			rk := r.rankNeed(q.req.GetModel(), q.req.GetType(), need)
			ranked = q.untried(rk.ranked)
			if len(ranked) == 0 {
				// As for the first attempt: the peers banned from the
				// model are tried when nothing else is left.
				ranked = q.untried(rk.lastResort)
			}
		}
		ranked = q.usable(ranked)
		if len(ranked) > 0 || retry || fromDHT || q.failures == 0 || q.failures >= r.maxAttempts || !q.movable() ||
			q.waited >= freshWait || q.waits >= maxCandidateWaits && !q.lostWorker() {
			return ranked, true
		}
		d := min(r.backoffFor(q.waits+1), freshWait-q.waited)
		if dl, ok := ctx.Deadline(); ok && time.Until(dl) < d+time.Second {
			return ranked, true
		}
		q.waits++
		q.waited += d
		if !sleepCtx(ctx, d) {
			return nil, false
		}
	}
}

// tryKey is a peer process a query has tried: a peer that restarted since
// is a new candidate.
type tryKey struct {
	peer        peer.ID
	incarnation uint64
}

// Kinds of failures of a peer itself.
type failKind int

const (
	failUnreachable  failKind = iota // no stream could be opened
	failSilent                       // no Accepted within the bound
	failDied                         // the stream broke after Accepted
	failStalled                      // the stream went silent after Accepted (frozen, or its network lost)
	failStuck                        // heartbeats after Accepted, but no progress within the stall bound
	failInvalid                      // a protocol violation
	failBackend                      // the worker reported a retryable failure
	failFlood                        // more output than the query allows
	failQueued                       // queued without output past queueStalls while another could answer: moved, not blamed
	failQueueLie                     // failQueued, at a queue position its announcement cannot explain (queueLie): blamed
	failEarlyTimeout                 // TIMEOUT while the query had earlyTimeout or more left here (workerError.early)
	numFailKinds
)

// peerFailure is a failure of the peer itself (not of this node, the
// request or the deadline): it counts against the peer's health.
type peerFailure struct {
	kind failKind
	err  *protocol.Error
	conn network.Conn // the connection it ran on, once a stream opened
}

func (e peerFailure) Error() string { return e.err.Error() }
func (e peerFailure) Unwrap() error { return e.err }

// staleConn is a stream lost with a dead connection to a peer that is
// connected again on another: the same peer is tried again, at no cost.
type staleConn struct{ err *protocol.Error }

func (e staleConn) Error() string { return e.err.Error() }
func (e staleConn) Unwrap() error { return e.err }

// pathLost is a stream lost with a relayed connection to a peer that can
// be reached another way, or with a direct connection to a peer that also
// has a relayed one: the same peer is tried again on another path.
type pathLost struct {
	err      *protocol.Error
	silent   bool // it went silent rather than broke
	accepted bool
	relay    peer.ID // the relay the lost path ran through, if any
}

func (e pathLost) Error() string { return e.err.Error() }
func (e pathLost) Unwrap() error { return e.err }

// maxPathRetries bounds the free retries of one query on another path;
// pathRetryWait is the wait before the first, doubling for the next.
const (
	maxPathRetries = 3
	pathRetryWait  = 250 * time.Millisecond
)

// maxStaleRetries bounds the free retries of one query on a peer that
// was reached through a dead connection.
const maxStaleRetries = 3

// maxSilentRetries bounds the retries of one query on the worker that
// fell silent on it (silentButAlive).
const maxSilentRetries = 1

// silentButAlive reports whether the query should go back to c, which
// fell silent on it (kind: failStalled or failSilent): no other worker
// could take it, c could, and c answers a ping now. A stream can fall
// silent past the silence bound on a live connection: TCP backs off
// each retransmission of a segment lost again (0.2, 0.4, 0.8, 1.6 s),
// so a lossy link holds a stream's heartbeats for seconds while the
// process and its connection live. A frozen or vanished worker answers no
// ping and is not asked again; a live one that falls silent again is
// not either.
//
// It is asked past its breaker (scored.alive), which the same silence on
// its other streams may have opened, but not past a ban: a violation, or
// a spot check's distrust. Nor into the last second before the query's
// deadline, which is left for the error to reach the caller.
func (r *Router) silentButAlive(ctx context.Context, q *query, c scored, kind failKind) bool {
	if kind != failStalled && kind != failSilent || q.silentRetries >= maxSilentRetries ||
		q.failures >= r.maxAttempts || len(q.usable([]scored{c})) == 0 || r.othersNow(q, c) ||
		r.distrusted(c.Peer) || r.violated(c.Peer) || !timeLeft(ctx) {
		return false
	}
	alive, err := r.answersPing(ctx, c)
	log.Debugw("a worker fell silent on the query, and no other can take it: pinged", "peer", c.Peer, "alive", alive, "err", err)
	return alive && timeLeft(ctx)
}

// violated reports whether p broke the protocol since its last success.
func (r *Router) violated(p peer.ID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.peers[p]
	return st != nil && st.tracker.Violated()
}

// timeLeft reports whether more than a second is left before ctx's
// deadline, if it has one.
func timeLeft(ctx context.Context) bool {
	dl, ok := ctx.Deadline()
	return !ok || time.Until(dl) > time.Second
}

// localBusy is a limit of this node (its resource manager refused a
// stream): backpressure, not the peer's fault.
type localBusy struct{ err *protocol.Error }

func (e localBusy) Error() string { return e.err.Error() }
func (e localBusy) Unwrap() error { return e.err }

// query is the state of one routed query across its attempts.
type query struct {
	req         *pb.QueryRequest
	h           Handler
	restartable bool
	later       bool // CountersignLater
	continuable bool // chat or vision: text output a worker may continue
	tried       map[tryKey]bool
	attempts    int
	failures    int
	busy        int
	continued   int
	waits       int           // for a candidate after all had failed
	waited      time.Duration // in those waits
	writers     []peer.ID
	kinds       [numFailKinds]int
	gone        error // the handler's refusal: the caller left
	stale       int   // free retries after a dead connection
	// silentRetries: retries on the worker that fell silent on the
	// query, as no other could take it (silentButAlive); silentKind, how
	// it fell silent, counted in kinds while silentCounted.
	silentRetries int
	silentKind    failKind
	silentCounted bool
	// earlyWhy: what the last worker that timed out early said (its
	// backend's 504, say), for the summary: the operator's clue.
	earlyWhy    string
	pathRetries int      // free retries on another path after a relay broke
	avoid       peer.ID  // a relay that broke this query's path: dial around it
	need        []string // features the query needs of a worker
	// dht: the providers the query found in the DHT, when its model had
	// no worker in the table.
	dht []scored
	// empty: an answer with no output, set aside while another worker
	// is asked (see emptyAnswer); the answer if none does better and no
	// output reached the client since (outputs still emptyAt), and then
	// settled (its receipt, its energy) with finishEmpty. blameEmpty,
	// under r.mu, counts it against its worker's model once another
	// worker answers with output.
	empty       *Result
	finishEmpty func()
	blameEmpty  func()
	emptyAt     uint64
	// outputs counts the output events passed to the handler, and its
	// resets: what the client holds changed when it moved.
	outputs uint64

	// What reached the handler so far.
	out      bool            // any output event
	text     strings.Builder // Chunk text, while continuable
	chunks   uint32
	resumeAt string // the continuation sent with the current attempt
}

// lostWorker reports whether a worker the query tried died, went silent
// or could not be reached: a process that may be starting again.
func (q *query) lostWorker() bool {
	return q.kinds[failDied]+q.kinds[failStalled]+q.kinds[failSilent]+q.kinds[failUnreachable] > 0
}

func (q *query) started() bool { return q.out }

// othersNow reports whether a worker other than c could take q now: one
// the query has not tried and can move to (q.usable), in a fresh ranking
// (workers join and die while a worker stalls), or among the DHT's
// providers the query began with; and the query has an attempt left for
// it. A worker banned from the model (a last resort) does not count: a
// live worker that is slow is a better bet than one that keeps failing.
func (r *Router) othersNow(q *query, c scored) bool { return len(r.others(q, c)) > 0 }

// othersPing bounds the ping (and the dial, if need be) of another worker
// before a stalled query moves to it, and othersPinged how many are
// pinged at most.
const (
	othersPing   = 2 * time.Second
	othersPinged = 3
)

// othersAlive is othersNow for a stall: another worker could take the
// query, and it answers a ping now. A worker frozen or killed since its
// last announcement (SIGSTOP, SIGKILL on QUIC, a machine that hangs)
// still looks available for up to its announcements' TTL (30 s by
// default); moving a stalled query to it would fail the query where the
// stalled worker may yet answer. One that does not answer within
// othersPing, dial included, is passed over (its connections handed to
// the connection checker): waiting on for another period is the safe
// mistake, as the stalled worker goes on meanwhile.
func (r *Router) othersAlive(ctx context.Context, q *query, c scored) bool {
	for i, o := range r.others(q, c) {
		if i == othersPinged {
			return false
		}
		alive, err := r.answersPing(ctx, o)
		if ctx.Err() != nil {
			return false // the query ended, not the peer
		}
		if alive {
			return true
		}
		log.Debugw("another worker did not answer a ping: the stalled query stays", "peer", o.Peer, "err", err)
	}
	return false
}

// answersPing reports whether o answers a ping within othersPing, dial
// included. Queries that stall at once share one ping of each peer
// (libp2p lets a peer hold few pings at once), which does not end with
// the query that started it. One that does not answer has its
// connections handed to the connection checker.
func (r *Router) answersPing(ctx context.Context, o scored) (bool, error) {
	ch := r.pings.DoChan(string(o.Peer), func() (any, error) {
		// Detached from the first caller's query: the others wait on it.
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), othersPing)
		defer cancel()
		// Reached as a query would be: its announced addresses, no
		// dial back-off from an earlier failure.
		r.ensureAddrs(pctx, o)
		r.clearBackoff(o.Peer)
		// Ping closes its channel without a result when pctx ends.
		res, ok := <-ping.Ping(pctx, r.h, o.Peer)
		if ok && (res.Error == nil || pingAnswered(res.Error)) {
			return true, nil
		}
		if r.checker != nil {
			for _, conn := range r.h.Network().ConnsToPeer(o.Peer) {
				r.checker.Suspect(conn)
			}
		}
		return false, cmp.Or(res.Error, pctx.Err())
	})
	select {
	case <-ctx.Done():
		return false, ctx.Err()
	case res := <-ch:
		alive, _ := res.Val.(bool)
		return alive, res.Err
	}
}

// pingAnswered reports whether a failed ping still shows a live peer: it
// reset the stream or refused the protocol (answering, so alive), or a
// resource limit kept the stream from opening (libp2p lets a peer hold
// few pings at once, which queries stalling together share with the
// connection checks).
func pingAnswered(err error) bool {
	return liveness.Refused(err) || liveness.RefusedProtocol(err)
}

// others are the workers q could move to from c now: untried, usable,
// neither full nor failing.
func (r *Router) others(q *query, c scored) []scored {
	if q.failures+1 >= r.maxAttempts {
		return nil
	}
	ranked := q.dht
	if ranked == nil {
		ranked = r.rankNeed(q.req.GetModel(), q.req.GetType(), q.need).ranked
	}
	ranked = q.untried(slices.Clone(ranked))
	r.mu.Lock()
	ranked = slices.DeleteFunc(ranked, func(o scored) bool {
		// Full, or failing (its breaker open or its one trial taken):
		// it could not take the query now either.
		st := r.peers[o.Peer]
		return o.Peer == c.Peer || o.full || (st != nil && !st.tracker.Available())
	})
	r.mu.Unlock()
	return q.usable(ranked)
}

// triedPeers lists the peers q tried.
func (q *query) triedPeers() []peer.ID {
	out := make([]peer.ID, 0, len(q.tried))
	for k := range q.tried {
		out = append(out, k.peer)
	}
	return out
}

// untried drops the peer processes this query already tried.
func (q *query) untried(ranked []scored) []scored {
	return slices.DeleteFunc(ranked, func(c scored) bool {
		return q.tried[tryKey{c.Peer, c.Announce.GetIncarnation()}]
	})
}

// movable reports whether another worker may still take q: nothing of
// it reached the caller yet, or the caller takes a restart, or its text
// so far can be continued.
func (q *query) movable() bool {
	return !q.started() || q.restartable || q.textContinuable()
}

// textContinuable reports whether q's answer so far can be continued by a
// worker that announces the continue feature.
func (q *query) textContinuable() bool {
	return q.continuable && q.text.Len() <= protocol.MaxContinuation
}

// usable keeps, once output has reached the handler, the workers that can
// take the answer over: any of them if the caller can discard what it got
// (those that can continue it first), else only those that can continue.
func (q *query) usable(ranked []scored) []scored {
	if !q.started() {
		return ranked
	}
	if !q.movable() {
		return nil
	}
	canGo := q.textContinuable()
	cont := func(c scored) bool { return canGo && canContinue(c, q.req) }
	if !q.restartable {
		return slices.DeleteFunc(ranked, func(c scored) bool { return !cont(c) })
	}
	slices.SortStableFunc(ranked, func(a, b scored) int {
		switch ca, cb := cont(a), cont(b); {
		case ca && !cb:
			return -1
		case cb && !ca:
			return 1
		}
		return 0
	})
	return ranked
}

// canContinue reports whether c announces the continue feature for the
// query's model.
func canContinue(c scored, req *pb.QueryRequest) bool {
	mi := modelInfo(c.Announce, req.GetModel(), req.GetType())
	return mi != nil && slices.Contains(mi.GetFeatures(), protocol.FeatureContinue)
}

// resume prepares the next attempt after output reached the handler:
// continue the answer on c where it can, else start it over.
func (q *query) resume(c scored) error {
	if q.textContinuable() && canContinue(c, q.req) {
		q.resumeAt = q.req.GetContinuation() + q.text.String()
		return nil
	}
	// usable let c through: the caller can discard the output.
	q.outputs++
	if err := q.h(nil); err != nil {
		return protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
	}
	q.out, q.chunks, q.resumeAt, q.writers = false, 0, "", nil
	q.text.Reset()
	return nil
}

// request is the request of the current attempt.
func (q *query) request() *pb.QueryRequest {
	if q.resumeAt == "" {
		return q.req
	}
	r := proto.CloneOf(q.req)
	r.Continuation = q.resumeAt
	if p := r.GetParams(); p.GetMaxTokens() > 0 {
		// What was said counts against the answer's length: a chunk
		// holds at least one token.
		p.MaxTokens = max(p.GetMaxTokens(), q.chunks+1) - q.chunks
	}
	return r
}

// emit passes one event of the current attempt to the handler: Accepted
// only until output has started (after that it is a heartbeat, or the
// next worker of a continued answer), output always.
func (q *query) emit(ev *pb.Event) error {
	switch k := ev.GetKind().(type) {
	case *pb.Event_Accepted:
		if q.out {
			return nil
		}
	case *pb.Event_Chunk:
		q.out = true
		q.outputs++
		q.chunks++
		if q.continuable && q.text.Len() <= protocol.MaxContinuation {
			q.text.WriteString(k.Chunk.GetText())
		}
	default:
		q.out = true
		q.outputs++
		q.continuable = false
	}
	return q.h(ev)
}

// lastOf takes back the silence of a worker asked again (c.alive) once
// the retry fails, whatever the way: the summary counts one worker once,
// by its last failure.
func (q *query) lastOf(c scored) {
	if c.alive && q.silentCounted {
		q.kinds[q.silentKind]--
		q.silentCounted = false
	}
}

// summary says what happened to a query whose attempts ran out.
func (q *query) summary() string {
	names := [numFailKinds]string{
		failUnreachable:  "could not be reached",
		failSilent:       "did not answer",
		failDied:         "died while answering",
		failStalled:      "went silent while answering",
		failStuck:        "made no progress",
		failInvalid:      "broke the protocol",
		failBackend:      "had a failing backend",
		failFlood:        "sent endless output",
		failQueued:       "kept it queued",
		failQueueLie:     "kept it queued behind more than they announced",
		failEarlyTimeout: "timed out long before the deadline",
	}
	var parts []string
	for k, n := range q.kinds {
		if n == 0 {
			continue
		}
		w := "workers"
		if n == 1 {
			w = "worker"
		}
		part := fmt.Sprintf("%d %s %s", n, w, names[k])
		if failKind(k) == failEarlyTimeout && q.earlyWhy != "" {
			// A worker's words, for a client to read: cleaned, bounded.
			part += fmt.Sprintf(" (last: %s)", protocol.CleanText(q.earlyWhy, maxWhy))
		}
		parts = append(parts, part)
	}
	if q.busy > 0 {
		parts = append(parts, fmt.Sprintf("%d busy or shutting down", q.busy))
	}
	if len(parts) == 0 {
		return "no worker could answer"
	}
	return strings.Join(parts, ", ")
}

// onlyUnreachable says whether every failure the query met was a worker
// that could not be reached.
func (q *query) onlyUnreachable() bool {
	for k, c := range q.kinds {
		if failKind(k) != failUnreachable && c > 0 {
			return false
		}
	}
	return q.busy == 0
}

func (q *query) peerFailures() int {
	n := 0
	for k, c := range q.kinds {
		if failKind(k) != failBackend {
			n += c
		}
	}
	return n
}

// listed reports whether the swarm's catalogue (WithCatalog) lists model
// for queries of type t.
func (r *Router) listed(model string, t pb.QueryType) bool {
	if r.catalog == nil {
		return false
	}
	v, ok := r.catalog.CatalogModel(model)
	return ok && slices.Contains(v.Types, protocol.TypeName(t))
}

// findProviders looks model's providers up for wait at most.
func (r *Router) findProviders(ctx context.Context, model string, wait time.Duration) ([]peer.AddrInfo, error) {
	pctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	return r.providers.FindProviders(pctx, model, 8)
}

// fromProviders turns DHT providers of a model into candidates with
// default figures; the first attempt will tell whether they serve it.
func (r *Router) fromProviders(ctx context.Context, model string, t pb.QueryType) []scored {
	start := time.Now()
	wait := providerWait
	if r.listed(model, t) {
		wait = providerWaitListed
	}
	infos, err := r.findProviders(ctx, model, wait)
	if len(infos) == 0 && wait == providerWait && ctx.Err() == nil && r.listed(model, t) && !r.rankNeed(model, t, nil).known {
		// The catalogue came to list the model meanwhile (a worker that
		// just joined, announced to the swarm's view nodes first), and
		// the model's topic has not brought a worker to the table.
		infos, err = r.findProviders(ctx, model, providerWaitListed-time.Since(start))
	}
	if err != nil {
		log.Debugw("provider lookup failed", "model", model, "err", err)
		return nil
	}
	var out []scored
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ai := range infos {
		if ai.ID == r.h.ID() && r.local == nil {
			continue
		}
		// A provider that failed us lately (its breaker is open) is
		// most likely a stale record of a dead worker.
		st := r.peers[ai.ID]
		if st != nil && !st.tracker.Available() {
			continue
		}
		if len(ai.Addrs) > 0 {
			r.h.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
		}
		// One whose queue held a query lately goes last (heldFirst).
		held := st != nil && now.Before(st.heldUntil)
		out = append(out, scored{Candidate: Candidate{Peer: ai.ID}, score: float64(len(out)), held: held})
	}
	byRank(out)
	return out
}

// earlyTimeout is how much of a query's time must be left, by this
// node's clock, for a worker's TIMEOUT to be the worker's failure: the
// deadline a worker enforces is wall-clock time (docs/protocol.md §8),
// so a worker whose clock runs ahead of this node's stops queries early
// by as much (at once when it is further ahead than the time left); a
// worker's backend may time out on its own too. Such a query moves on to
// another worker when one can take it, as after a failing backend, and
// it counts against the worker's model. Once the attempt has sent
// output, only a TIMEOUT with more than the skew announcements allow
// (protocol.MaxClockSkew) left is: short of it, moving on would restart
// an answer the client has partly read, for a few seconds' gain.
const earlyTimeout = 2 * time.Second

// maxWhy bounds the worker's words a query's summary carries (earlyWhy).
const maxWhy = 200

// timeoutEarly reports whether pe is a TIMEOUT that came early (see
// earlyTimeout), and how much of the query's time was left: from ctx's
// deadline, or from the 10 min a worker allows from its request
// (protocol.MaxQueryDeadline; sent: when it was written), the sooner.
func timeoutEarly(ctx context.Context, pe *protocol.Error, sent time.Time, answered bool) (left time.Duration, early bool) {
	if pe == nil || pe.Code != protocol.CodeTimeout {
		return 0, false
	}
	dl, ok := ctx.Deadline()
	if !ok {
		return 0, false
	}
	if cut := sent.Add(protocol.MaxQueryDeadline); cut.Before(dl) {
		dl = cut
	}
	left = time.Until(dl)
	if answered {
		return left, left > protocol.MaxClockSkew
	}
	return left, left >= earlyTimeout
}

// expired reports whether ctx ended or its deadline passed: a read
// deadline set to the query's deadline can fire before ctx's own timer.
func expired(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	dl, ok := ctx.Deadline()
	return ok && !time.Now().Before(dl)
}

func ctxErr(ctx context.Context) *protocol.Error {
	if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return protocol.Errorf(protocol.CodeTimeout, "query deadline exceeded")
	}
	return protocol.Errorf(protocol.CodeCancelled, "query cancelled")
}

// attempt runs the current request of q on one peer.
func (r *Router) attempt(ctx context.Context, c scored, q *query) (*Result, error) {
	p := c.Peer
	r.mu.Lock()
	st := r.state(p)
	if mt := st.model(q.req.GetModel()); (mt != nil && !c.lastResort && !mt.Allow()) || (!c.alive && !st.tracker.Allow()) {
		// Another query holds the half-open trial: skip, at no cost.
		r.mu.Unlock()
		return nil, workerError{err: protocol.Errorf(protocol.CodeUnavailable, "worker %s is failing (circuit open)", ShortID(p))}
	}
	st.inflight++
	if st.name == "" {
		st.name = p.String()
	}
	name := st.name
	if st.inflight == 1 {
		// Keep the connection while queries are open on it.
		r.h.ConnManager().Protect(p, InFlightTag)
	}
	stall := r.stallBound(c, st, q.req) // reads st's measures: under the lock
	r.mu.Unlock()
	left := false // st.inflight given back
	leaveLocked := func() {
		left = true
		st.inflight--
		if st.inflight == 0 {
			r.h.ConnManager().Unprotect(p, InFlightTag)
		}
	}
	defer func() {
		// A panicking handler (net/http recovers it) must not keep the
		// peer in flight and its connection protected for good.
		if v := recover(); v != nil {
			r.mu.Lock()
			if !left {
				leaveLocked()
			}
			r.mu.Unlock()
			panic(v)
		}
	}()
	start := time.Now()
	var first time.Time
	chunksBefore := q.chunks
	check := r.newReceiptCheck()
	wrap := func(ev *pb.Event) error {
		check.add(ev)
		if _, acc := ev.GetKind().(*pb.Event_Accepted); !acc && first.IsZero() {
			first = time.Now()
			if _, failed := ev.GetKind().(*pb.Event_Error); !failed {
				q.writers = append(q.writers, p)
				if q.resumeAt != "" {
					// Counted when the next worker writes, not when it is
					// tried: a try that fails first took nothing over.
					q.continued++
				}
			}
		}
		if err := q.emit(ev); err != nil {
			q.gone = err
			return err
		}
		return nil
	}
	req := q.request()
	var done *pb.Done
	var err error
	local := p == r.h.ID() && r.local != nil
	if local {
		done, err = r.local.Serve(ctx, req, wrap)
		var pe *protocol.Error
		if errors.As(err, &pe) {
			// Our own worker shares our clock, so its TIMEOUT with time
			// left is its backend's own (a gateway's 504, a transport
			// timeout): another worker may answer, as for a remote one.
			// Errors and Done are returned, not emitted: first is the
			// remote path's answered.
			we := workerError{err: pe}
			if rest, early := timeoutEarly(ctx, pe, start, !first.IsZero()); early {
				log.Debugw("own worker timed out with time left", "left", rest, "err", pe)
				we.early = true
			}
			err = we
		}
	} else {
		alone := func() bool { return !r.othersAlive(ctx, q, c) }
		done, err = r.remote(ctx, c, req, stall, alone, q.avoid, wrap)
	}
	end := time.Now()
	if check != nil {
		check.end = end // what the attempt showed, however late it settles
	}
	// An answer with nothing in it, while another worker could answer, is
	// set aside and the query moves on: a liar answering nothing at once
	// would otherwise look like the swarm's fastest worker. Whether it
	// counts against the worker (for the model) waits for what the next
	// one answers: text blames it; nothing, too, says the prompt's
	// answer is empty, and the second empty answer is the answer.
	var empty error
	if err == nil && first.IsZero() && q.empty == nil && emptyAnswer(req, done) && r.othersNow(q, c) {
		empty = workerError{err: &protocol.Error{Code: protocol.CodeBackendError, Retryable: true,
			Message: fmt.Sprintf("worker %s answered nothing", ShortID(p))}}
	}
	r.mu.Lock()
	leaveLocked()
	measured := 0.0
	if !expired(ctx) && empty == nil {
		// A query whose own deadline ran out tells nothing of the peer.
		r.recordLocked(st, c.Candidate, q.req.GetModel(), err, first, start, end)
		if err == nil && !first.IsZero() && !local {
			measured = st.ttft
		}
	}
	if err == nil && empty == nil && !first.IsZero() && q.blameEmpty != nil {
		q.blameEmpty()
		q.blameEmpty = nil
	}
	r.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if measured > 0 && r.measurer != nil {
		r.measurer.Measured(p, measured)
	}
	if first.IsZero() {
		first = end
	}
	res := &Result{Peer: p, Local: local, Done: done, TTFTMs: uint32(first.Sub(start).Milliseconds()), name: name}
	finish := func() {
		_ = r.settle(check, p, local, q.later, req, done) // before done's usage changes
		r.noteEnergy(p, req.GetModel(), done)
		if q.continued > 0 && done.GetUsage() != nil {
			// The answer's earlier part came from other workers.
			done.Usage.CompletionTokens = uint32(min(uint64(done.Usage.CompletionTokens)+uint64(chunksBefore), math.MaxUint32))
		}
	}
	if empty != nil {
		// Not countersigned, recorded or counted yet: only if it
		// becomes the answer, or (blame) when another worker answers.
		res.Writers = slices.Clone(q.writers)
		q.empty, q.finishEmpty, q.emptyAt = res, finish, q.outputs
		model := q.req.GetModel()
		q.blameEmpty = func() { r.modelTrackerLocked(st, model).Record(health.Failure) }
		return nil, empty
	}
	finish()
	return res, nil
}

// emptyAnswer says whether done ends an answer to req that should have
// had text and had none: a chat or vision query that stopped (not at
// its length limit, where a reasoning model's hidden thinking may have
// taken every token) with no output at all. Honest ones exist (a stop
// sequence that matches at once, a continuation whose first worker had
// sent it all): the caller asks once per query, and a second worker's
// empty answer is the answer.
func emptyAnswer(req *pb.QueryRequest, done *pb.Done) bool {
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION:
	default:
		return false
	}
	f := done.GetFinishReason()
	return f == "" || f == protocol.FinishStop
}

// workerError is an error the worker itself reported in an Error event:
// the peer is alive and answering; what failed is its backend or the
// request, which the worker's own health and breaker account for.
type workerError struct {
	err *protocol.Error
	// early: a TIMEOUT while earlyTimeout or more of the query's time
	// was left (timeoutEarly): its clock ahead, its backend's own
	// timeout, or a lie; another worker may answer.
	early bool
}

func (e workerError) Error() string { return e.err.Error() }
func (e workerError) Unwrap() error { return e.err }

// recordLocked records what an attempt showed of st's peer: c is the
// announcement the attempt was ranked on (its incarnation, the process
// that was asked).
func (r *Router) recordLocked(st *peerState, c Candidate, model string, err error, first, start, end time.Time) {
	if err == nil {
		// In fractions of a millisecond: a worker on a LAN answers within
		// one, and a whole 0 would read as no measurement.
		if !first.IsZero() {
			st.ttft = ewma(st.ttft, msOf(first.Sub(start)))
		}
		st.service = ewma(st.service, msOf(end.Sub(start)))
		st.tracker.Record(health.Success)
		if mt := st.model(model); mt != nil {
			mt.Record(health.Success)
		}
		if !first.IsZero() {
			st.holds = 0 // it answered: a row of holds ends
		}
		st.failConn = nil
		return
	}
	// A worker's report of a failure (its backend, an internal error, a
	// model it announces but does not serve) counts against that model
	// only: a user asking one broken model must not take a healthy peer
	// out for every model, and a worker that keeps failing a model it
	// announces is banned from it.
	var we workerError
	if errors.As(err, &we) {
		switch {
		case we.early, we.err.Code == protocol.CodeBackendError, we.err.Code == protocol.CodeInternal, we.err.Code == protocol.CodeUnsupported:
			r.modelTrackerLocked(st, model).Record(health.Failure)
		}
		return
	}
	// Otherwise only the peer's own failures count: not a limit of ours,
	// or a client that left.
	var pf peerFailure
	if !errors.As(err, &pf) {
		return
	}
	if pf.kind == failUnreachable {
		st.unreachableAt = end
		return
	}
	if pf.conn != nil {
		st.failConn = pf.conn
	}
	switch pf.kind {
	case failSilent, failDied, failStalled, failStuck:
		st.tracker.Record(health.Timeout)
	case failInvalid, failFlood:
		st.tracker.Record(health.Violation)
	case failQueued, failQueueLie:
		// A busy worker is not a failing one; its queue steps were
		// plausible (queueLie), and the query moved on. Either ranks
		// after the free workers for a while (heldFirst).
		if pf.kind == failQueueLie {
			st.tracker.Record(health.Timeout)
		}
		st.heldUntil = end.Add(min(heldFirst<<min(st.holds, 10), heldMost))
		st.holds++
	default:
		st.tracker.Record(health.Failure)
	}
	r.oldFailureLocked(c.Peer, st, c.Announce.GetIncarnation())
}

// modelTrackerLocked returns the health of a peer's model, made on first
// failure. The map stays bounded: healthy trackers go first.
func (r *Router) modelTrackerLocked(st *peerState, model string) *health.Tracker {
	if mt := st.models[model]; mt != nil {
		return mt
	}
	if st.models == nil {
		st.models = map[string]*health.Tracker{}
	}
	if len(st.models) >= maxModelTrackers {
		for m, mt := range st.models {
			if mt.Available() {
				delete(st.models, m)
			}
		}
		if len(st.models) >= maxModelTrackers {
			clear(st.models)
		}
	}
	mt := health.New(r.trackerOpts...)
	st.models[model] = mt
	return mt
}

// stallBound is how long the worker c may go without progress on req
// while it heartbeats: 10 × the TTFT expected of it, within bounds; media
// comes whole, so a longer upper bound for it. Past it the query moves on
// only if another worker could take it then (othersNow): for the only
// worker left, whose heartbeats say it lives, giving up would end the
// query with an error where waiting may bring the answer (a model server
// loading the model, a long prompt on a CPU); the worker's own bounds on
// its backend and the query's deadline still hold.
func (r *Router) stallBound(c scored, st *peerState, req *pb.QueryRequest) time.Duration {
	if r.stall > 0 {
		return r.stall
	}
	upper := maxStall
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION, pb.QueryType_QUERY_TYPE_EMBED:
	default:
		upper = maxMediaStall
	}
	ttft := st.ttft
	if mi := modelInfo(c.Announce, req.GetModel(), req.GetType()); ttft == 0 && mi != nil {
		ttft = float64(mi.GetP50TtftMs())
	}
	if ttft == 0 {
		return upper / 2
	}
	return min(max(10*time.Duration(ttft)*time.Millisecond, minStall), upper)
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func ewma(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return old + 0.2*(v-old)
}

// acceptBound is how long a worker may take to send Accepted for req: a
// live worker answers at once, after reading the request, which takes
// longer for one that carries media.
func (r *Router) acceptBound(req *pb.QueryRequest) time.Duration {
	return r.accept + time.Duration(proto.Size(req)>>20)*time.Second
}

// silenceBound is how long a worker that declared heartbeat interval hb
// (0: a worker from before heartbeat_ms) may stay silent: two and a half
// beats, twice the longest silence of a live worker, which beats within
// a quarter interval of falling silent.
func (r *Router) silenceBound(hb time.Duration) time.Duration {
	if r.idle > 0 {
		return r.idle
	}
	if hb <= 0 {
		hb = protocol.LegacyHeartbeat
	}
	return max(hb, minHeartbeat) * 5 / 2
}

// clearBackoff forgets the swarm's dial back-off for p, which a dial
// that failed moments ago (ours or another part of the node's) left: the
// router decides for itself when to try a peer again.
func (r *Router) clearBackoff(p peer.ID) {
	if sw, ok := r.h.Network().(*swarm.Swarm); ok {
		sw.Backoff().Clear(p)
	}
}

// minHeartbeat is the shortest heartbeat interval the router takes from a
// worker, so that a worker cannot make it spin.
const minHeartbeat = 250 * time.Millisecond

// remote runs the query over a libp2p stream.
func (r *Router) remote(ctx context.Context, c scored, req *pb.QueryRequest, stall time.Duration, alone func() bool, avoid peer.ID, emit func(*pb.Event) error) (done *pb.Done, err error) {
	p := c.Peer
	// Our own queue for a turn to open a stream: neither the dial's nor
	// the worker's Accepted bound runs meanwhile.
	release, ok := r.pace.try(p)
	if !ok {
		before := r.breaker(p)
		var err error
		if release, err = r.pace.acquire(ctx, p); err != nil {
			return nil, err
		}
		if before == health.Closed && r.breaker(p) == health.Open {
			// The opens ahead of this one failed (a frozen worker): move
			// on at no cost rather than wait out the Accepted bound again.
			release()
			return nil, workerError{err: protocol.Errorf(protocol.CodeUnavailable, "worker %s failed while this query waited to reach it", ShortID(p))}
		}
	}
	defer release()
	dctx, cancel := context.WithTimeout(ctx, r.dial)
	// Connected, an open waits only for the transport's flow control: a
	// QUIC connection carries 256 streams of one side at once (go-libp2p's
	// MaxIncomingStreams), and further opens wait for one to end, queued
	// at a live worker. The query's deadline bounds that; the dial bound
	// would take a worker answering 256 long queries for unreachable.
	octx := dctx
	if avoid == "" && r.h.Network().Connectedness(p) == network.Connected {
		octx = ctx
	}
	r.ensureAddrs(dctx, c)
	if avoid != "" {
		r.connectAround(dctx, p, avoid)
	}
	s, err := r.h.NewStream(network.WithAllowLimitedConn(octx, "mtor-query"), p, r.proto)
	if err != nil && ctx.Err() == nil && octx.Err() == nil && errors.Is(err, swarm.ErrDialBackoff) {
		// Another dial to p (discovery's, over a lossy link) failed
		// moments ago. The query dials for itself: peers that keep
		// failing are the health tracker's to avoid, not the back-off's.
		r.clearBackoff(p)
		s, err = r.h.NewStream(network.WithAllowLimitedConn(octx, "mtor-query"), p, r.proto)
	}
	if err != nil && ctx.Err() == nil && dctx.Err() == nil && !errors.Is(err, network.ErrResourceLimitExceeded) && r.reresolve(dctx, p) {
		// The addresses we had did not work, and there are others now.
		s, err = r.h.NewStream(network.WithAllowLimitedConn(dctx, "mtor-query"), p, r.proto)
	}
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctxErr(ctx)
		}
		if errors.Is(err, network.ErrResourceLimitExceeded) && !isRemoteRefusal(err) {
			return nil, localBusy{protocol.Errorf(protocol.CodeBusy, "this node has too many queries open; try again shortly")}
		}
		if protocol.RefusedAtLimit(err) {
			return nil, refusedStream(p)
		}
		// Transport errors name addresses; they go to the log, not to
		// whoever asked (who may be a browser behind a bridge).
		log.Debugw("open stream", "peer", p, "err", err)
		return nil, peerFailure{kind: failUnreachable, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s could not be reached", ShortID(p))}
	}
	defer func() {
		// A failure of the peer's names the connection it ran on.
		if pf, ok := err.(peerFailure); ok {
			pf.conn = s.Conn()
			err = pf
		}
	}()
	// Cancelling the query resets the stream, which the worker sees at once.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	defer stop()
	defer func() {
		// A panicking handler: the worker must not answer into the void.
		if v := recover(); v != nil {
			_ = s.Reset()
			panic(v)
		}
	}()
	dl, _ := ctx.Deadline()
	acceptWait := r.acceptBound(req) // sizes the request: once, not per event
	// A request larger than the stream's window waits for the worker to
	// read it: a frozen worker never does. The worker itself gives up on a
	// request not whole after protocol.RequestTimeout, so a write that
	// takes longer is to a silent worker, and the query moves on.
	_ = s.SetWriteDeadline(earliest(dl, time.Now().Add(max(acceptWait, r.send))))
	sent := time.Now() // the worker's 10 min count from about here (timeoutEarly)
	if err := protocol.WriteFrame(s, req); err != nil {
		_ = s.Reset()
		if errors.Is(err, protocol.ErrEncode) {
			// The request, not the worker, is at fault (a string that is
			// not UTF-8): no other worker can take it either.
			return nil, protocol.Errorf(protocol.CodeBadRequest, "the request cannot be sent: %v", err)
		}
		return nil, r.streamErr(ctx, s, false, fmt.Errorf("sending request: %w", err))
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	accepted := false
	var beat time.Duration
	// Progress: output, or a step forward in the worker's queue. A worker
	// that heartbeats without progress for stall is stalling. A queue
	// position beyond what the worker announced it queues, or an empty
	// chunk, is no progress: a liar could count down from 2^32, or
	// trickle nothing, to hold a query to its deadline.
	progress, queuePos := time.Now(), uint32(math.MaxUint32)
	queueMax := uint32(2 * protocol.MaxAnnSlots) // a candidate from the DHT announced nothing
	if l := c.Announce.GetLoad(); l != nil {
		// Its queue may have grown since it announced: twice that.
		queueMax = 2 * (min(l.GetMaxQueue(), protocol.MaxAnnSlots) + min(l.GetMaxConcurrency(), protocol.MaxAnnSlots))
	}
	// moved: progress since the stamp above, stamped at the next read
	// that waits (events read ahead in one batch cost one clock read, not
	// one each: it showed in profiles, a read per token). produced and
	// lastOut are the same for output alone: queue steps without output
	// hold the query queueStalls periods at most (see queueStalls).
	moved, produced, lastOut := false, false, time.Now()
	answered := false // output came on this attempt
	var worst uint32  // the furthest back in its queue the worker put the query
	// blocked: when the last read that waits began; quiet: when the
	// silence began that waiting on a stalled worker carries over from
	// one stall period to the next (zero when not waiting on), so that
	// waiting on stretches the silence bound by no more than the time
	// spent asking whether another worker could take the query.
	var blocked, quiet time.Time
	out := outputBudget{bytes: r.maxOutput, chunks: chunkLimit(req)}
	for {
		// A live worker answers Accepted at once and repeats it as a
		// heartbeat whenever it is otherwise silent; silence past these
		// bounds means a frozen or cut-off worker, and the query moves on.
		wait := acceptWait
		if accepted {
			wait = r.silenceBound(beat)
		}
		if !fr.Ready() {
			// An event already read ahead needs no deadline: re-arming
			// yamux's timer per event cost more than reading the event.
			now := time.Now()
			if moved {
				progress, moved = now, false
			}
			if produced {
				lastOut, produced = now, false
			}
			blocked = now
			rd := earliest(dl, cmp.Or(quiet, now).Add(wait))
			if stall > 0 {
				rd = earliest(rd, progress.Add(stall))
				if accepted {
					rd = earliest(rd, lastOut.Add(queueStalls*stall))
				}
			}
			_ = s.SetReadDeadline(rd)
		}
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			now := time.Now()
			stuck := !moved && !now.Before(progress.Add(stall))
			held := !produced && !now.Before(lastOut.Add(queueStalls*stall))
			if stall > 0 && accepted && !expired(ctx) && (stuck || held) {
				silentFrom := cmp.Or(quiet, blocked)
				if errors.Is(err, protocol.ErrBetweenFrames) && protocol.IsTimeout(err) && time.Since(silentFrom) < wait && alone() {
					// Nobody else could take the query now: the
					// worker, whose heartbeats say it lives, may yet
					// answer (a model loading, a long prompt on a
					// CPU, a queue). Asked again after the next
					// stall period.
					log.Debugw("worker stalls, and no other could take the query: waiting on", "peer", p, "stall", stall, "queued", !stuck)
					// Asking (the others' pings, up to 6 s) took a while
					// in which this stream was not read: the bounds move
					// on by it, or a read deadline already past would
					// fail at once on QUIC with events still unread.
					after := time.Now()
					asked := after.Sub(now)
					progress, quiet = after, silentFrom.Add(asked)
					r.waitedOn.Add(1)
					if held {
						lastOut = after.Add((1 - queueStalls) * stall) // asked again a period on
					} else {
						lastOut = lastOut.Add(asked)
					}
					continue
				}
				if time.Since(silentFrom) >= wait {
					// Silent, not merely stalled: a frozen worker.
					_ = s.Reset()
					return nil, r.streamErr(ctx, s, accepted, err)
				}
				_ = s.Reset()
				if !stuck {
					// Moved on; blamed only when the queue was one its
					// announcement cannot explain.
					kind := failQueued
					if queueLie(c, worst) {
						kind = failQueueLie
					}
					log.Debugw("worker holds the query in its queue", "peer", p, "stall", stall, "position", worst, "blamed", kind == failQueueLie)
					return nil, peerFailure{kind: kind, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s kept the query in its queue for %s or more without output", ShortID(p), (queueStalls * stall).Round(time.Millisecond))}
				}
				log.Debugw("worker stalls", "peer", p, "stall", stall)
				return nil, peerFailure{kind: failStuck, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s made no progress for %s", ShortID(p), stall.Round(time.Millisecond))}
			}
			_ = s.Reset()
			if !accepted && protocol.RefusedAtLimit(err) {
				return nil, refusedStream(p)
			}
			return nil, r.streamErr(ctx, s, accepted, err)
		}
		release() // the worker has taken the stream: the next may open
		quiet = time.Time{}
		err := protocol.ValidateEvent(&ev)
		if err == nil {
			err = protocol.ValidateEventFor(req, &ev)
		}
		if err == nil && !accepted {
			// The stream's grammar: Error, or Accepted before anything
			// else (docs/protocol.md §7). A Done first is an answer
			// claimed without one.
			switch ev.GetKind().(type) {
			case *pb.Event_Accepted, *pb.Event_Error:
			default:
				err = fmt.Errorf("%T before Accepted", ev.GetKind())
			}
		}
		if err != nil {
			_ = s.Reset()
			return nil, peerFailure{kind: failInvalid, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s sent an invalid event: %v", ShortID(p), err)}
		}
		if c := ev.GetChunk(); c != nil && c.GetText() == "" && len(c.GetLogprobs()) == 0 {
			// Nothing: not progress, and not output to pass on (it would
			// start the answer, and a worker failing after it could no
			// longer be replaced by a restart).
			continue
		}
		switch k := ev.GetKind().(type) {
		case *pb.Event_Done:
			_ = s.Close()
			return k.Done, nil
		case *pb.Event_Error:
			_ = s.Close()
			pe := protocol.FromProto(k.Error)
			if left, early := timeoutEarly(ctx, pe, sent, answered); early {
				log.Debugw("worker timed out with time left", "peer", p, "left", left, "err", pe)
				return nil, workerError{err: pe, early: true}
			}
			return nil, workerError{err: pe}
		case *pb.Event_Accepted:
			accepted = true
			beat = time.Duration(k.Accepted.GetHeartbeatMs()) * time.Millisecond
			pos := k.Accepted.GetQueuePosition()
			worst = max(worst, pos)
			if pos < queuePos {
				queuePos, moved = pos, moved || pos <= queueMax
			}
		default:
			moved, produced, answered = true, true, true
			if !out.spend(&ev) {
				_ = s.Reset()
				log.Debugw("worker floods output", "peer", p)
				return nil, peerFailure{kind: failFlood, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s sent more output than the query allows", ShortID(p))}
			}
		}
		if err := emit(&ev); err != nil {
			_ = s.Reset()
			return nil, err
		}
	}
}

// queueSlack is how many more queries than a worker announced queued
// may stand ahead of a new one: its announcement is up to a period old,
// and other routers send it queries meanwhile. A worker's default queue
// holds 64.
const queueSlack = 64

// queueLie reports whether a worker put a query at a queue position its
// announcement cannot explain: more ahead of it than it announced queued,
// plus as many as it runs at once, plus queueSlack. A liar that announces
// itself idle to be chosen, then counts a long queue down, is blamed; an
// honest busy worker is not. One found through the DHT announced nothing.
func queueLie(c scored, pos uint32) bool {
	l := c.Announce.GetLoad()
	if l == nil {
		return false
	}
	return uint64(pos) > uint64(l.GetQueued())+uint64(l.GetMaxConcurrency())+queueSlack
}

// isRemoteRefusal reports whether a resource-limit error came from the
// peer (it reset the stream) rather than from this node's manager.
func isRemoteRefusal(err error) bool {
	var se *network.StreamError
	return errors.As(err, &se) && se.Remote
}

// breaker is the state of p's circuit breaker.
func (r *Router) breaker(p peer.ID) health.BreakerState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state(p).tracker.State()
}

// refusedStream is a worker's refusal of a stream at its limits: it is
// busy, not failing.
func refusedStream(p peer.ID) error {
	return workerError{err: protocol.Errorf(protocol.CodeBusy, "worker %s refused the stream: it holds as many as it allows", ShortID(p))}
}

// ensureAddrs gives the peerstore addresses for c when we are not
// connected to it: those it announced, else a DHT lookup (a worker learnt
// of through gossip relayed by others).
func (r *Router) ensureAddrs(ctx context.Context, c scored) {
	p := c.Peer
	if r.h.Network().Connectedness(p) == network.Connected {
		return
	}
	if addrs := announcedAddrs(c.Announce); len(addrs) > 0 {
		r.h.Peerstore().AddAddrs(p, addrs, peerstore.TempAddrTTL)
		return
	}
	if r.finder == nil || len(r.h.Peerstore().Addrs(p)) > 0 {
		return
	}
	ai, err := r.finder.FindPeer(ctx, p)
	if err != nil {
		log.Debugw("find peer", "peer", p, "err", err)
		return
	}
	r.h.Peerstore().AddAddrs(p, ai.Addrs, peerstore.TempAddrTTL)
}

// reresolve looks a peer's addresses up again after a failed dial (a
// worker behind NAT gains a relayed address; a restarted one, new ports)
// and clears the dial back-off. It reports whether it found addresses we
// did not have.
func (r *Router) reresolve(ctx context.Context, p peer.ID) bool {
	if r.finder == nil {
		return false
	}
	ai, err := r.finder.FindPeer(ctx, p)
	if err != nil {
		log.Debugw("find peer after a failed dial", "peer", p, "err", err.Error())
		return false
	}
	known := r.h.Peerstore().Addrs(p)
	fresh := false
	for _, a := range ai.Addrs {
		if !slices.ContainsFunc(known, a.Equal) {
			fresh = true
		}
	}
	if !fresh {
		return false
	}
	r.h.Peerstore().AddAddrs(p, ai.Addrs, peerstore.TempAddrTTL)
	r.clearBackoff(p)
	return true
}

// announcedAddrs parses the addresses of an announcement, skipping bad ones.
func announcedAddrs(a *pb.Announce) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, b := range a.GetAddrs() {
		if m, err := ma.NewMultiaddrBytes(b); err == nil {
			out = append(out, m)
		}
	}
	return out
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// streamErr types a broken query stream. A stream that went silent most
// likely runs over a connection to a peer that vanished without a reset
// (QUIC, a frozen process, a lost network): the connection is probed and
// closed if dead, so that neither this query's successor nor the next
// query is sent down it again.
func (r *Router) streamErr(ctx context.Context, s network.Stream, accepted bool, err error) error {
	if expired(ctx) {
		return ctxErr(ctx)
	}
	p := s.Conn().RemotePeer()
	log.Debugw("query stream failed", "peer", p, "accepted", accepted, "err", err)
	silent := protocol.IsTimeout(err)
	if relayaddr.IsRelayed(s.Conn()) && r.hasOtherPath(s.Conn()) {
		// The relay (or its connection to either side) may have gone
		// away, not the worker: try it again over another path — a
		// direct connection or its other relay — at no cost, a bounded
		// number of times (a frozen worker is silent on every path).
		_ = s.Conn().Close()
		var via peer.ID
		if relay, err := s.Conn().RemoteMultiaddr().ValueForProtocol(ma.P_P2P); err == nil {
			via, _ = peer.Decode(relay)
		}
		if r.checker != nil && via != "" {
			// Our connection to the relay itself may be as dead (a QUIC
			// one stays open after the relay vanished): probe it.
			for _, c := range r.h.Network().ConnsToPeer(via) {
				r.checker.Suspect(c)
			}
		}
		return pathLost{protocol.Errorf(protocol.CodeUnavailable, "the relayed connection to worker %s broke", ShortID(p)), silent, accepted, via}
	}
	if !relayaddr.IsRelayed(s.Conn()) && r.hasRelayedConn(s.Conn()) {
		// A direct connection made by a hole punch lives on the NATs'
		// mappings, which can die while the relayed connection it
		// replaced (kept as the fallback) is fine: close it, so that
		// the retry takes the relay.
		_ = s.Conn().Close()
		return pathLost{protocol.Errorf(protocol.CodeUnavailable, "the direct connection to worker %s broke", ShortID(p)), silent, accepted, ""}
	}
	if r.checker != nil {
		if r.checker.Dead(s.Conn()) && r.h.Network().Connectedness(p) == network.Connected {
			// The stream ran on a connection to the peer's previous
			// process, closed as dead; the peer is back on another.
			return staleConn{protocol.Errorf(protocol.CodeUnavailable, "worker %s was reached through a dead connection", ShortID(p))}
		}
		if silent {
			r.checker.Suspect(s.Conn())
		}
	}
	switch {
	case !accepted && silent:
		return peerFailure{kind: failSilent, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s did not answer", ShortID(p))}
	case silent:
		return peerFailure{kind: failStalled, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s went silent while answering", ShortID(p))}
	}
	return peerFailure{kind: failDied, err: protocol.Errorf(protocol.CodeUnavailable, "worker %s died while answering", ShortID(p))}
}

// hasRelayedConn reports whether the peer of broken has an open relayed
// connection besides it.
func (r *Router) hasRelayedConn(broken network.Conn) bool {
	for _, c := range r.h.Network().ConnsToPeer(broken.RemotePeer()) {
		if c != broken && !c.IsClosed() && relayaddr.IsRelayed(c) {
			return true
		}
	}
	return false
}

// hasOtherPath reports whether the peer of a broken relayed connection
// can be reached another way: another connection, or an address that is
// not through the same relay.
func (r *Router) hasOtherPath(broken network.Conn) bool {
	p := broken.RemotePeer()
	for _, c := range r.h.Network().ConnsToPeer(p) {
		if c != broken && !c.IsClosed() {
			return true
		}
	}
	relay, _ := broken.RemoteMultiaddr().ValueForProtocol(ma.P_P2P)
	for _, a := range r.h.Peerstore().Addrs(p) {
		if v, err := a.ValueForProtocol(ma.P_P2P); err != nil || v != relay {
			return true
		}
	}
	return false
}

// ShortID is the short form of a peer ID used in messages: the last six
// characters, as `mtor peers` shows them.
func ShortID(p peer.ID) string {
	s := p.String()
	if len(s) <= 6 {
		return s
	}
	return "…" + s[len(s)-6:]
}

type restartKey struct{}

// WithRestart marks a query's context as restartable: if a worker dies
// after output has reached the handler, the router calls the handler with
// a nil event (discard everything received so far) and runs the query
// again on the next candidate. Callers that cannot take output back (a
// stream already shown to a person) leave it off and get the error.
func WithRestart(ctx context.Context) context.Context {
	return context.WithValue(ctx, restartKey{}, true)
}

type laterKey struct{}

// CountersignLater marks a query whose caller does not pass the
// receipt of its answer on (an OpenAI-compatible client never sees it):
// the receipt is checked as always, but reaches Done and the Receipts
// callback without its countersignature, which receiptback adds with
// one signature for the receipts it returns together. Callers that
// hand the receipt to a client (the node API, WebSocket) leave it off.
func CountersignLater(ctx context.Context) context.Context {
	return context.WithValue(ctx, laterKey{}, true)
}

func countersignLater(ctx context.Context) bool {
	v, _ := ctx.Value(laterKey{}).(bool)
	return v
}

func restartable(ctx context.Context) bool {
	v, _ := ctx.Value(restartKey{}).(bool)
	return v
}

// outputBudget is what is left of the output one query may receive.
type outputBudget struct {
	bytes  int
	chunks int // 0: no bound
}

// chunkLimit bounds the chunks of a query that names max_tokens: a chunk
// carries at least one token, so twice as many (and some slack) is
// already a worker ignoring the request.
func chunkLimit(req *pb.QueryRequest) int {
	if mt := req.GetParams().GetMaxTokens(); mt > 0 {
		return 2*int(mt) + 64
	}
	return 0
}

// spend takes ev's output from the budget and reports whether it fit.
func (b *outputBudget) spend(ev *pb.Event) bool {
	switch k := ev.GetKind().(type) {
	case *pb.Event_Chunk:
		b.bytes -= len(k.Chunk.GetText())
		if b.chunks > 0 {
			if b.chunks--; b.chunks == 0 {
				return false
			}
		}
	case *pb.Event_Media:
		b.bytes -= len(k.Media.GetData())
	case *pb.Event_Embedding:
		b.bytes -= 4 * len(k.Embedding.GetVector())
	}
	return b.bytes >= 0
}

// connectAround connects to p, when not connected, by every address but
// those through the relay avoid: after that relay broke a query's path,
// libp2p would otherwise dial it again (or reuse a dead QUIC connection
// to it) alongside the other relays, and wait out that dial's timeout
// before the others' circuits. The host dials every address its
// peerstore holds for p, so those through avoid leave the peerstore (an
// announcement or identify brings them back). A failure is left to
// NewStream.
func (r *Router) connectAround(ctx context.Context, p, avoid peer.ID) {
	if r.h.Network().Connectedness(p) == network.Connected {
		return
	}
	var addrs []ma.Multiaddr
	for _, a := range r.h.Peerstore().Addrs(p) {
		if relay, err := a.ValueForProtocol(ma.P_P2P); err == nil && relay == avoid.String() {
			r.h.Peerstore().SetAddr(p, a, 0)
			continue
		}
		addrs = append(addrs, a)
	}
	if len(addrs) == 0 {
		return
	}
	r.clearBackoff(p)
	if err := r.h.Connect(ctx, peer.AddrInfo{ID: p, Addrs: addrs}); err != nil {
		log.Debugw("connect around a broken relay", "peer", p, "relay", avoid, "err", err)
	}
}

// sleepCtx waits d, or less when ctx ends (false then).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
