// Package router sends each query to the best-scoring capable worker,
// streams its events back, and fails over to the next candidate when a
// worker is busy, unreachable or fails before its first output.
package router

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"slices"
	"sort"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/router")

// Defaults.
const (
	DefaultDeadline    = 120 * time.Second
	DefaultMaxAttempts = 4
	DialTimeout        = 10 * time.Second
	// IdleTimeout bounds the silence between two frames once the worker
	// has accepted: three missed heartbeats.
	IdleTimeout = 3 * protocol.HeartbeatInterval
	// AcceptTimeout bounds the wait for a worker's first frame (Accepted).
	AcceptTimeout = 5 * time.Second
	// Score inputs used until a peer has measured figures.
	defaultTTFT    = 100 * time.Millisecond
	defaultService = time.Second
	providerWait   = 5 * time.Second
	protectTag     = "mtor-query"
	chooseSlackMs  = 10
)

// Candidate is a worker known from the peer table.
type Candidate struct {
	Peer     peer.ID
	Announce *pb.Announce
	RTT      time.Duration
	Received time.Time
}

// Table lists the workers the router may use.
type Table interface {
	Candidates() []Candidate
}

// Providers finds workers of a model in the DHT when the table has none.
type Providers interface {
	FindProviders(ctx context.Context, model string, limit int) ([]peer.AddrInfo, error)
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

// peerState is what this router has observed of one worker.
type peerState struct {
	inflight int
	tracker  *health.Tracker
	ttft     float64 // EWMA, ms, as seen from here (network included)
	service  float64 // EWMA, ms, total time of a query
}

// Router routes queries. It is safe for concurrent use.
type Router struct {
	h           host.Host
	proto       libp2pproto.ID
	table       Table
	providers   Providers
	finder      PeerFinder
	local       Local
	deadline    time.Duration
	maxAttempts int
	idle        time.Duration
	accept      time.Duration
	trackerOpts []health.Option

	mu    sync.Mutex
	peers map[peer.ID]*peerState
	rng   *mrand.Rand
}

// Option configures a Router.
type Option func(*Router)

// WithProviders enables DHT lookups for models missing from the table.
func WithProviders(p Providers) Option { return func(r *Router) { r.providers = p } }

// WithPeerFinder looks up addresses of peers it cannot reach otherwise.
func WithPeerFinder(f PeerFinder) Option { return func(r *Router) { r.finder = f } }

// WithLocal lets the router answer with this node's worker.
func WithLocal(l Local) Option { return func(r *Router) { r.local = l } }

// WithDefaultDeadline is used for queries without a deadline.
func WithDefaultDeadline(d time.Duration) Option { return func(r *Router) { r.deadline = d } }

// WithMaxAttempts bounds how many workers one query tries.
func WithMaxAttempts(n int) Option { return func(r *Router) { r.maxAttempts = n } }

// WithIdleTimeout bounds the silence between events of a stream.
func WithIdleTimeout(d time.Duration) Option { return func(r *Router) { r.idle = d } }

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
		idle:        IdleTimeout,
		accept:      AcceptTimeout,
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
	cands := r.table.Candidates()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pruneLocked(cands)
	// A peer not measured yet is assumed as fast as the measured ones on
	// average, so that it gets tried instead of losing to them for ever.
	var prior measures
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
		known = true
		if c.Announce.GetDraining() {
			continue
		}
		st := r.state(c.Peer)
		if !st.tracker.Available() {
			continue
		}
		ranked = append(ranked, scored{Candidate: c, score: r.score(c, mi, st, prior), full: full(c, st)})
	}
	// A peer with a free slot always comes before a full one: how long a
	// queue takes depends on work we cannot see (a long answer in front).
	sort.Slice(ranked, func(i, j int) bool {
		if ranked[i].full != ranked[j].full {
			return !ranked[i].full
		}
		return ranked[i].score < ranked[j].score
	})
	return ranked, known
}

// score is the expected time to first token in ms, divided by health: a
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

// pruneLocked forgets peers that left the table and have nothing in
// flight, so the state map stays bounded by the swarm's size.
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
	load := c.Announce.GetLoad()
	maxC := float64(max(load.GetMaxConcurrency(), 1))
	// Our own in-flight count is fresher than the announcement, which may
	// already include it: take the larger rather than the sum.
	occ := math.Max(float64(load.GetInFlight()+load.GetQueued()), float64(st.inflight))
	ttft := st.ttft
	if ttft == 0 {
		ttft = float64(mi.GetP50TtftMs())
	}
	if ttft == 0 {
		ttft = prior.meanTTFT()
	}
	if ttft == 0 {
		ttft = float64(defaultTTFT.Milliseconds())
	}
	svc := st.service
	if svc == 0 {
		svc = prior.meanSvc()
	}
	if svc == 0 {
		svc = float64(defaultService.Milliseconds())
	}
	wait := 0.0
	if occ >= maxC {
		wait = (occ - maxC + 1) / maxC * svc
	}
	est := float64(c.RTT.Milliseconds()) + ttft*(1+occ/maxC) + wait
	h := math.Min(float64(c.Announce.GetHealth()), st.tracker.Score()) / 100
	return est / math.Max(h, 0.05)
}

// choose picks between the two best by random choice, so that a burst of
// queries does not pile onto one peer before its load shows; a clearly
// better first choice always wins.
func (r *Router) choose(ranked []scored) int {
	// The slack keeps peers a few milliseconds apart (all fast, on one LAN)
	// in the draw even when one is twice as fast as the other.
	if len(ranked) < 2 || ranked[1].full != ranked[0].full || ranked[1].score > 2*ranked[0].score+chooseSlackMs {
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

// Query routes req and streams its events to h. See the package doc.
func (r *Router) Query(ctx context.Context, req *pb.QueryRequest, h Handler) (*Result, error) {
	start := time.Now()
	if len(req.GetId()) == 0 {
		req.Id = NewID()
	}
	if req.GetDeadlineUnixMs() == 0 {
		req.DeadlineUnixMs = start.Add(r.deadline).UnixMilli()
	}
	if err := protocol.ValidateRequest(req); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithDeadline(ctx, time.UnixMilli(req.GetDeadlineUnixMs()))
	defer cancel()

	ranked, known := r.rank(req.GetModel(), req.GetType())
	fromDHT := false
	if len(ranked) == 0 && !known && r.providers != nil {
		ranked = r.fromProviders(ctx, req.GetModel())
		fromDHT = len(ranked) > 0
	}
	if len(ranked) == 0 {
		if known {
			return nil, protocol.Errorf(protocol.CodeUnsupported, "no available peer serves model %q for %s right now (all draining or failing)", req.GetModel(), protocol.TypeName(req.GetType()))
		}
		return nil, protocol.Errorf(protocol.CodeUnsupported, "no peer in the swarm serves model %q for %s", req.GetModel(), protocol.TypeName(req.GetType()))
	}

	var lastErr *protocol.Error
	busy := 0
	attempts := 0
	for len(ranked) > 0 && attempts < r.maxAttempts {
		i := r.choose(ranked)
		c := ranked[i]
		ranked = slices.Delete(ranked, i, i+1)
		attempts++
		res, started, err := r.attempt(ctx, c.Peer, req, h)
		if err == nil {
			res.Attempts = attempts
			res.TotalMs = uint32(time.Since(start).Milliseconds())
			return res, nil
		}
		lastErr = protocol.AsError(err)
		if lastErr.Code == protocol.CodeBusy {
			busy++
		}
		// A worker answering UNSUPPORTED means our table was stale (the
		// model left it): another candidate may still serve the query.
		if (!lastErr.Retryable && lastErr.Code != protocol.CodeUnsupported) || ctx.Err() != nil {
			break
		}
		if started {
			// Output already reached the caller: only a caller that can
			// discard it may have the query run again elsewhere.
			if !restartable(ctx) || len(ranked) == 0 || attempts >= r.maxAttempts {
				break
			}
			if err := h(nil); err != nil {
				return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
			}
		}
		log.Debugw("retrying on next candidate", "peer", c.Peer, "started", started, "err", lastErr)
	}
	if ctx.Err() != nil {
		return nil, ctxErr(ctx)
	}
	if busy == attempts {
		return nil, protocol.Errorf(protocol.CodeBusy, "swarm busy: %d capable peer(s) tried, all busy", attempts)
	}
	if fromDHT && !lastErr.Retryable && lastErr.Code != protocol.CodeUnsupported {
		return nil, lastErr
	}
	if fromDHT {
		// Provider records outlive their workers by up to 48 h: nobody
		// announcing the model and no provider answering means nobody
		// serves it.
		return nil, protocol.Errorf(protocol.CodeUnsupported, "no peer in the swarm serves model %q for %s (%d provider record(s) in the DHT, none answered)", req.GetModel(), protocol.TypeName(req.GetType()), attempts)
	}
	return nil, lastErr
}

// fromProviders turns DHT providers of a model into candidates with
// default figures; the first attempt will tell whether they serve it.
func (r *Router) fromProviders(ctx context.Context, model string) []scored {
	pctx, cancel := context.WithTimeout(ctx, providerWait)
	defer cancel()
	infos, err := r.providers.FindProviders(pctx, model, 8)
	if err != nil {
		log.Debugw("provider lookup failed", "model", model, "err", err)
		return nil
	}
	var out []scored
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ai := range infos {
		if ai.ID == r.h.ID() && r.local == nil {
			continue
		}
		// A provider that failed us lately (its breaker is open) is
		// most likely a stale record of a dead worker.
		if st := r.peers[ai.ID]; st != nil && !st.tracker.Available() {
			continue
		}
		if len(ai.Addrs) > 0 {
			r.h.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
		}
		out = append(out, scored{Candidate: Candidate{Peer: ai.ID}, score: float64(len(out))})
	}
	return out
}

func ctxErr(ctx context.Context) *protocol.Error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return protocol.Errorf(protocol.CodeTimeout, "query deadline exceeded")
	}
	return protocol.Errorf(protocol.CodeCancelled, "query cancelled")
}

// attempt runs the query on one peer. started reports whether output
// reached the handler, after which a retry would duplicate it.
func (r *Router) attempt(ctx context.Context, p peer.ID, req *pb.QueryRequest, h Handler) (*Result, bool, error) {
	r.mu.Lock()
	st := r.state(p)
	if !st.tracker.Allow() {
		r.mu.Unlock()
		return nil, false, protocol.Errorf(protocol.CodeBackendError, "peer %s circuit open", p.ShortString())
	}
	st.inflight++
	if st.inflight == 1 {
		// Keep the connection while queries are open on it.
		r.h.ConnManager().Protect(p, protectTag)
	}
	r.mu.Unlock()
	start := time.Now()
	var first time.Time
	started := false
	wrap := func(ev *pb.Event) error {
		_, accepted := ev.GetKind().(*pb.Event_Accepted)
		switch {
		case accepted && started:
			return nil // a heartbeat between outputs: nothing to pass on
		case !accepted && !started:
			started = true
			first = time.Now()
		}
		return h(ev)
	}
	var done *pb.Done
	var err error
	local := p == r.h.ID() && r.local != nil
	if local {
		done, err = r.local.Serve(ctx, req, wrap)
		var pe *protocol.Error
		if errors.As(err, &pe) {
			err = workerError{pe}
		}
	} else {
		done, err = r.remote(ctx, p, req, wrap)
	}
	end := time.Now()
	r.mu.Lock()
	st.inflight--
	if st.inflight == 0 {
		r.h.ConnManager().Unprotect(p, protectTag)
	}
	r.recordLocked(st, err, first, start, end)
	r.mu.Unlock()
	if err != nil {
		return nil, started, err
	}
	if first.IsZero() {
		first = end
	}
	return &Result{Peer: p, Local: local, Done: done, TTFTMs: uint32(first.Sub(start).Milliseconds())}, started, nil
}

// workerError is an error the worker itself reported in an Error event:
// the peer is alive and answering; what failed is its backend or the
// request, which the worker's own health and breaker account for.
type workerError struct{ err *protocol.Error }

func (e workerError) Error() string { return e.err.Error() }
func (e workerError) Unwrap() error { return e.err }

func (r *Router) recordLocked(st *peerState, err error, first, start, end time.Time) {
	var we workerError
	if errors.As(err, &we) {
		// Not the peer's failure: a user asking one broken model must not
		// take a healthy peer out of the swarm for every model.
		return
	}
	if err == nil {
		if !first.IsZero() {
			st.ttft = ewma(st.ttft, float64(first.Sub(start).Milliseconds()))
		}
		st.service = ewma(st.service, float64(end.Sub(start).Milliseconds()))
		st.tracker.Record(health.Success)
		return
	}
	switch protocol.AsError(err).Code {
	case protocol.CodeBackendError, protocol.CodeInternal:
		st.tracker.Record(health.Failure)
	case protocol.CodeTimeout:
		st.tracker.Record(health.Timeout)
	}
}

func ewma(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return old + 0.2*(v-old)
}

// remote runs the query over a libp2p stream.
func (r *Router) remote(ctx context.Context, p peer.ID, req *pb.QueryRequest, emit func(*pb.Event) error) (*pb.Done, error) {
	dctx, cancel := context.WithTimeout(ctx, DialTimeout)
	r.ensureAddrs(dctx, p)
	s, err := r.h.NewStream(network.WithAllowLimitedConn(dctx, "mtor-query"), p, r.proto)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctxErr(ctx)
		}
		// Transport errors name addresses; they go to the log, not to
		// whoever asked (who may be a browser behind a bridge).
		log.Debugw("open stream", "peer", p, "err", err)
		return nil, protocol.Errorf(protocol.CodeBackendError, "peer %s is unreachable", p.ShortString())
	}
	// Cancelling the query resets the stream, which the worker sees at once.
	stop := context.AfterFunc(ctx, func() { _ = s.Reset() })
	defer stop()
	dl, _ := ctx.Deadline()
	_ = s.SetWriteDeadline(dl)
	if err := protocol.WriteFrame(s, req); err != nil {
		_ = s.Reset()
		return nil, r.streamErr(ctx, p, fmt.Errorf("sending request: %w", err))
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	first := true
	for {
		// A live worker answers Accepted at once and repeats it as a
		// heartbeat whenever it is otherwise silent; silence past these
		// bounds means a frozen or cut-off worker, and the query moves on.
		wait := r.idle
		if first {
			wait = r.accept
		}
		first = false
		_ = s.SetReadDeadline(earliest(dl, time.Now().Add(wait)))
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			_ = s.Reset()
			return nil, r.streamErr(ctx, p, err)
		}
		if err := protocol.ValidateEvent(&ev); err != nil {
			_ = s.Reset()
			return nil, protocol.Errorf(protocol.CodeBackendError, "peer %s sent an invalid event: %v", p.ShortString(), err)
		}
		switch k := ev.GetKind().(type) {
		case *pb.Event_Done:
			_ = s.Close()
			return k.Done, nil
		case *pb.Event_Error:
			_ = s.Close()
			return nil, workerError{protocol.FromProto(k.Error)}
		case *pb.Event_Accepted:
			if err := emit(&ev); err != nil {
				_ = s.Reset()
				return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
			}
		default:
			if err := emit(&ev); err != nil {
				_ = s.Reset()
				return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
			}
		}
	}
}

// ensureAddrs looks p up when we are not connected to it and know no
// address: a worker learnt of through gossip relayed by others.
func (r *Router) ensureAddrs(ctx context.Context, p peer.ID) {
	if r.finder == nil || r.h.Network().Connectedness(p) == network.Connected || len(r.h.Peerstore().Addrs(p)) > 0 {
		return
	}
	ai, err := r.finder.FindPeer(ctx, p)
	if err != nil {
		log.Debugw("find peer", "peer", p, "err", err)
		return
	}
	r.h.Peerstore().AddAddrs(p, ai.Addrs, peerstore.TempAddrTTL)
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

func (r *Router) streamErr(ctx context.Context, p peer.ID, err error) error {
	if ctx.Err() != nil {
		return ctxErr(ctx)
	}
	log.Debugw("query stream failed", "peer", p, "err", err)
	// A silent worker is a failed worker (retryable elsewhere), not a
	// query that ran out of time: the query's own deadline is ctx's.
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		return protocol.Errorf(protocol.CodeBackendError, "peer %s went silent", p.ShortString())
	}
	return protocol.Errorf(protocol.CodeBackendError, "the stream to peer %s broke before the answer ended", p.ShortString())
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

func restartable(ctx context.Context) bool {
	v, _ := ctx.Value(restartKey{}).(bool)
	return v
}
