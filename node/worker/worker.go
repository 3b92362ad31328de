// Package worker serves queries on this node: it reads a query from a
// libp2p stream (or takes it in-process from the router), admits it under
// bounded concurrency, calls the backend and streams events back.
package worker

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/node/gpu"
	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

var log = logging.Logger("mtor/worker")

// Defaults for admission and deadlines. docs/protocol.md states the same.
const (
	DefaultMaxConcurrency = 4
	DefaultMaxQueue       = 64
	DefaultDeadline       = 120 * time.Second
	MaxDeadline           = protocol.MaxQueryDeadline
)

// EnergyMeter measures the GPU energy of one query: Begin starts a
// measurement, the returned func ends it.
type EnergyMeter interface {
	Begin() (end func() (mJ uint64, ok bool))
}

// ModelCap is one servable model with its measured figures.
type ModelCap struct {
	Name           string
	Types          []pb.QueryType
	ContextLength  uint32
	Backend        string
	TokensPerSec   float32
	P50TTFTMs      uint32
	JoulesPerToken float32
	Features       []string // union over the backends serving it
}

// served is one model of one backend.
type served struct {
	b     *bound
	model backend.Model
}

// bound is a backend with its health.
type bound struct {
	backend.Backend
	health   *health.Tracker
	inflight atomic.Int64 // queries running on it, so that a removed one is seen to drain
}

// Worker serves queries with its backends.
type Worker struct {
	bmu      sync.Mutex
	backends []*bound // replaced whole by SetBackends, never changed in place
	// refreshMu lets one Refresh run at a time: a slow one started before
	// SetBackends must not bring back the models of a removed backend.
	refreshMu sync.Mutex
	adm       *admission
	streams   *goPool // runs each query stream's goroutines
	version   string
	meter     EnergyMeter
	defDL     time.Duration
	beat      time.Duration
	onChange  func()

	// Receipts: the identity key that signs them (nil: none), this
	// node's peer ID, and where receipts of answers delivered to another
	// node go (the ledger's "served").
	key       crypto.PrivKey
	self      peer.ID
	onServed  func(*pb.Receipt)
	balanceOf func(peer.ID) int64 // nil: no preference for contributors
	serving   func(peer.ID, int)  // WithServing

	draining atomic.Bool
	inflight atomic.Int64 // queries not yet fully answered, streams included

	qmu     sync.Mutex
	queries map[*int]context.CancelCauseFunc // running and queued, for HandBack

	mu     sync.RWMutex
	models map[string][]served // by model name; refreshed from the backends
	stats  map[string]*modelStats
	energy *gpu.EnergyStats // joules per token per model
}

// Option configures a Worker.
type Option func(*Worker)

// WithMaxConcurrency bounds queries running at once.
func WithMaxConcurrency(n int) Option {
	return func(w *Worker) {
		if n > 0 {
			w.adm.max = n
		}
	}
}

// WithMaxQueue bounds queries waiting for a slot; more are BUSY.
func WithMaxQueue(n int) Option {
	return func(w *Worker) {
		if n >= 0 {
			w.adm.maxQueue = n
		}
	}
}

// WithVersion sets the version reported in Done.
func WithVersion(v string) Option { return func(w *Worker) { w.version = v } }

// WithEnergyMeter measures GPU energy per query.
func WithEnergyMeter(m EnergyMeter) Option { return func(w *Worker) { w.meter = m } }

// WithDefaultDeadline is used for requests without a deadline.
func WithDefaultDeadline(d time.Duration) Option { return func(w *Worker) { w.defDL = d } }

// WithHeartbeat sets how often Accepted repeats before output (tests).
func WithHeartbeat(d time.Duration) Option {
	return func(w *Worker) {
		if d > 0 {
			w.beat = d
		}
	}
}

// WithSigner signs a receipt for every answer with key, the node's
// libp2p identity key (docs/protocol.md §6.4).
func WithSigner(key crypto.PrivKey) Option {
	return func(w *Worker) {
		if key == nil {
			return
		}
		if id, err := peer.IDFromPrivateKey(key); err == nil {
			w.key, w.self = key, id
		}
	}
}

// WithOnServed is called with the receipt of every answer this worker
// delivered to another node, after its Done was written.
func WithOnServed(f func(*pb.Receipt)) Option { return func(w *Worker) { w.onServed = f } }

// WithPreferContributors orders the queue (when queries wait for a slot)
// by the requester's contribution to this node: balance reports it in
// milliseconds of work the requester did for us minus what we did for it
// (ledger.Balance). Requesters with a positive balance go first, those
// with a negative one last; priority and arrival order within each.
func WithPreferContributors(balance func(peer.ID) int64) Option {
	return func(w *Worker) { w.balanceOf = balance }
}

// WithServing has f told of each query stream from a peer as it starts
// (+1) and as it ends (-1): the node's gossip-link repair, which closes a
// peer's connections, waits for them (discovery.WithBusy). f must not
// block.
func WithServing(f func(p peer.ID, delta int)) Option { return func(w *Worker) { w.serving = f } }

// WithOnChange is called (without locks held) when load or models change,
// so the announcer can publish promptly.
func WithOnChange(f func()) Option { return func(w *Worker) { w.onChange = f } }

// New builds a worker. Call Refresh to learn the backends' models.
func New(backends []backend.Backend, opts ...Option) *Worker {
	w := &Worker{
		adm:      newAdmission(DefaultMaxConcurrency, DefaultMaxQueue),
		version:  "dev",
		defDL:    DefaultDeadline,
		beat:     protocol.HeartbeatInterval,
		onChange: func() {},
		models:   map[string][]served{},
		stats:    map[string]*modelStats{},
		energy:   gpu.NewEnergyStats(),
		queries:  map[*int]context.CancelCauseFunc{},
		streams:  newGoPool(keptGoroutines, keptIdle),
	}
	for _, b := range backends {
		w.backends = append(w.backends, &bound{Backend: b, health: health.New()})
	}
	for _, o := range opts {
		o(w)
	}
	return w
}

// Refresh probes every backend and reloads its model list. A model that
// disappears from its backend disappears from the worker; a backend whose
// probe fails loses health and, once its breaker opens after repeated
// failures, its models.
func (w *Worker) Refresh(ctx context.Context) {
	w.refreshMu.Lock()
	defer w.refreshMu.Unlock()
	w.refresh(ctx)
}

// bounds is the current backend list; the slice is never changed in place.
func (w *Worker) bounds() []*bound {
	w.bmu.Lock()
	defer w.bmu.Unlock()
	return w.backends
}

// SetBackends replaces the worker's backends (a reload): a backend in bs
// that the worker already has (the same value) keeps its health and
// statistics; a new one is probed at once; a removed one gets no new
// queries, while those already running on it finish (Removed.InFlight). The
// models are refreshed before it returns, which returns the removed
// backends.
func (w *Worker) SetBackends(ctx context.Context, bs []backend.Backend) []Removed {
	w.refreshMu.Lock()
	defer w.refreshMu.Unlock()
	old := w.bounds()
	next := make([]*bound, 0, len(bs))
	keep := map[*bound]bool{}
	for _, b := range bs {
		i := slices.IndexFunc(old, func(o *bound) bool { return o.Backend == b })
		if i >= 0 {
			next = append(next, old[i])
			keep[old[i]] = true
			continue
		}
		next = append(next, &bound{Backend: b, health: health.New()})
	}
	w.bmu.Lock()
	w.backends = next
	w.bmu.Unlock()
	// The removed backends' models go at once, before the probes of the
	// new ones, so that no new query is sent to them meanwhile.
	w.mu.Lock()
	for name, ss := range w.models {
		ss = slices.DeleteFunc(slices.Clone(ss), func(sv served) bool { return !keep[sv.b] })
		if len(ss) == 0 {
			delete(w.models, name)
		} else {
			w.models[name] = ss
		}
	}
	w.mu.Unlock()
	w.onChange()
	w.refresh(ctx)
	var removed []Removed
	for _, o := range old {
		if !keep[o] {
			removed = append(removed, Removed{Backend: o.Backend, b: o})
		}
	}
	return removed
}

// Removed is a backend that SetBackends took away, with the queries still
// running on it.
type Removed struct {
	backend.Backend
	b *bound
}

// InFlight is how many queries still run on the removed backend.
func (r Removed) InFlight() int { return int(r.b.inflight.Load()) }

func (w *Worker) refresh(ctx context.Context) {
	backends := w.bounds()
	type result struct {
		b      *bound
		models []backend.Model
		err    error
	}
	results := make([]result, len(backends))
	var wg sync.WaitGroup
	for i, b := range backends {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			err := b.Probe(pctx)
			var ms []backend.Model
			if err == nil {
				ms, err = b.Models(pctx)
			}
			results[i] = result{b, ms, err}
		}()
	}
	wg.Wait()
	next := map[string][]served{}
	for _, r := range results {
		if r.err != nil {
			r.b.health.Record(health.Failure)
			log.Warnw("backend probe failed", "backend", r.b.Name(), "err", r.err)
		} else {
			r.b.health.Record(health.Success)
		}
		if !r.b.health.Available() {
			continue // breaker open: its models leave the announcement
		}
		if r.err != nil {
			// One failed probe is not yet a dead backend: keep offering
			// what it served until the breaker opens.
			w.mu.RLock()
			for name, ss := range w.models {
				for _, sv := range ss {
					if sv.b == r.b {
						next[name] = append(next[name], sv)
					}
				}
			}
			w.mu.RUnlock()
			continue
		}
		for _, m := range r.models {
			if protocol.ValidateModelName(m.Name) != nil || len(m.Types) == 0 {
				continue
			}
			next[m.Name] = append(next[m.Name], served{b: r.b, model: m})
		}
	}
	w.mu.Lock()
	changed := !sameModels(w.models, next)
	w.models = next
	for name := range next {
		if w.stats[name] == nil {
			w.stats[name] = &modelStats{}
		}
	}
	w.mu.Unlock()
	if changed {
		w.onChange()
	}
}

func sameModels(a, b map[string][]served) bool {
	if len(a) != len(b) {
		return false
	}
	for k, va := range a {
		vb := b[k]
		if len(va) != len(vb) {
			return false
		}
		for i := range va {
			if va[i].b != vb[i].b || fmt.Sprint(va[i].model.Types) != fmt.Sprint(vb[i].model.Types) {
				return false
			}
		}
	}
	return true
}

// Capabilities lists the models this worker can serve now with their
// measured figures, for announcements.
func (w *Worker) Capabilities() []ModelCap {
	w.mu.RLock()
	defer w.mu.RUnlock()
	out := make([]ModelCap, 0, len(w.models))
	for name, ss := range w.models {
		c := ModelCap{Name: name, Backend: ss[0].b.Kind(), ContextLength: ss[0].model.ContextLength}
		seen := map[pb.QueryType]bool{}
		for _, s := range ss {
			for _, t := range s.model.Types {
				if !seen[t] {
					seen[t] = true
					c.Types = append(c.Types, t)
				}
			}
			for _, f := range s.model.Features {
				if !slices.Contains(c.Features, f) {
					c.Features = append(c.Features, f)
				}
			}
		}
		c.TokensPerSec, c.P50TTFTMs = w.stats[name].snapshot()
		c.JoulesPerToken = w.energy.JoulesPerToken(name)
		out = append(out, c)
	}
	return out
}

// Load reports running and queued queries and the limits.
func (w *Worker) Load() (running, queued, maxConcurrency, maxQueue int) {
	r, q := w.adm.load()
	return r, q, w.adm.max, w.adm.maxQueue
}

// Health is the mean health score of the backends, 0..100 (100 with none).
func (w *Worker) Health() uint32 {
	backends := w.bounds()
	if len(backends) == 0 {
		return 100
	}
	var sum float64
	for _, b := range backends {
		sum += b.health.Score()
	}
	return uint32(sum / float64(len(backends)))
}

// BackendStatus is the health of one backend.
type BackendStatus struct {
	Name    string
	Kind    string
	Score   float64
	Breaker string // closed, open, half-open
}

// Backends reports each backend's health and breaker state.
func (w *Worker) Backends() []BackendStatus {
	backends := w.bounds()
	out := make([]BackendStatus, len(backends))
	for i, b := range backends {
		out[i] = BackendStatus{Name: b.Name(), Kind: b.Kind(), Score: b.health.Score(), Breaker: b.health.State().String()}
	}
	return out
}

// Drain makes the worker refuse new queries with BUSY.
func (w *Worker) Drain() { w.draining.Store(true) }

// errHandBack ends the queries a stopping worker hands back.
var errHandBack = errors.New("worker shutting down")

// HandBack ends every query still queued or running with a retryable
// UNAVAILABLE "worker shutting down", so that their clients move them to
// another worker (continuing an answer where the model allows) rather
// than lose them when the process exits. It returns how many it ended.
func (w *Worker) HandBack() int {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	for _, cancel := range w.queries {
		cancel(errHandBack)
	}
	return len(w.queries)
}

// track registers a query's cancel for HandBack; the returned func
// unregisters it.
func (w *Worker) track(cancel context.CancelCauseFunc) func() {
	k := new(int)
	w.qmu.Lock()
	w.queries[k] = cancel
	w.qmu.Unlock()
	return func() {
		w.qmu.Lock()
		delete(w.queries, k)
		w.qmu.Unlock()
	}
}

// Draining reports whether Drain was called.
func (w *Worker) Draining() bool { return w.draining.Load() }

// Wait blocks until queries in flight have ended (their last frame
// written) or ctx is done.
func (w *Worker) Wait(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for w.inflight.Load() > 0 {
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// pick returns a backend serving model for type t whose breaker allows a
// call, preferring the healthiest. It must announce the features need
// (a continuation needs "continue", tools "tools", ...): a backend that
// would silently ignore what the query asks is no answer.
func (w *Worker) pick(model string, t pb.QueryType, need []string) (*bound, *modelStats, error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	var best *bound
	found, served := false, false
	for _, s := range w.models[model] {
		if !s.model.HasType(t) {
			continue
		}
		served = true
		if !s.model.HasFeatures(need) {
			continue
		}
		found = true
		if s.b.health.Available() && (best == nil || s.b.health.Score() > best.health.Score()) {
			best = s.b
		}
	}
	switch {
	case served && !found && slices.Equal(need, []string{protocol.FeatureContinue}):
		return nil, nil, protocol.Errorf(protocol.CodeUnsupported, "this worker cannot continue an answer of model %q", model)
	case served && !found:
		return nil, nil, protocol.Errorf(protocol.CodeUnsupported, "model %q of this worker lacks a feature the query needs (%s)", model, strings.Join(need, ", "))
	case !found:
		return nil, nil, protocol.Errorf(protocol.CodeUnsupported, "this worker does not serve model %q for %s", model, protocol.TypeName(t))
	case best == nil || !best.health.Allow():
		return nil, nil, protocol.Errorf(protocol.CodeBackendError, "backend for model %q is failing (circuit open)", model)
	}
	return best, w.stats[model], nil
}

// Emit receives the events of a query before its end.
type Emit func(*pb.Event) error

// Serve answers one query in-process: it emits Accepted and the output
// events, and returns the Done event or a typed error. Nothing is emitted
// after it returns. The requester is this node itself.
func (w *Worker) Serve(ctx context.Context, req *pb.QueryRequest, emit Emit) (*pb.Done, error) {
	return w.ServeFor(ctx, w.self, req, emit)
}

// tier is the queue tier of a query from requester.
func (w *Worker) tier(requester peer.ID) int {
	if w.balanceOf == nil || requester == "" || requester == w.self {
		return 0
	}
	switch b := w.balanceOf(requester); {
	case b > 0:
		return 1
	case b < 0:
		return -1
	}
	return 0
}

// ServeFor is Serve for a query sent by requester; its Done carries a
// signed receipt when the worker has a signer.
func (w *Worker) ServeFor(ctx context.Context, requester peer.ID, req *pb.QueryRequest, emit Emit) (*pb.Done, error) {
	return w.serve(ctx, requester, req, emit, false)
}

// serve is ServeFor; with reuse, emit must not keep an event past its
// call (a stream's writer encodes it at once): the text chunks then reuse
// one event, three allocations less per token.
func (w *Worker) serve(ctx context.Context, requester peer.ID, req *pb.QueryRequest, emit Emit, reuse bool) (*pb.Done, error) {
	start := time.Now()
	if err := protocol.ValidateRequest(req); err != nil {
		return nil, err
	}
	if w.draining.Load() {
		return nil, protocol.Errorf(protocol.CodeBusy, "worker is shutting down")
	}
	w.inflight.Add(1)
	defer w.inflight.Add(-1)

	dl := start.Add(w.defDL)
	if ms := req.GetDeadlineUnixMs(); ms > 0 {
		dl = time.UnixMilli(ms)
		if dl.Sub(start) > MaxDeadline {
			dl = start.Add(MaxDeadline)
		}
	}
	if !dl.After(start) {
		return nil, protocol.Errorf(protocol.CodeTimeout, "deadline passed before the query started")
	}
	ctx, cancelDL := context.WithDeadline(ctx, dl)
	defer cancelDL()
	ctx, cancelCause := context.WithCancelCause(ctx)
	cancel := func() { cancelCause(context.Canceled) }
	defer cancel()
	defer w.track(cancelCause)()

	need := protocol.RequiredFeatures(req)
	if req.GetContinuation() != "" {
		need = append(need, protocol.FeatureContinue)
	}
	b, stats, err := w.pick(req.GetModel(), req.GetType(), need)
	if err != nil {
		return nil, err
	}
	b.inflight.Add(1)
	defer b.inflight.Add(-1)
	t, pos, err := w.adm.enter(req.GetPriority(), w.tier(requester))
	if err != nil {
		return nil, err
	}
	w.onChange()
	// Whenever the worker has sent nothing for a heartbeat interval it
	// repeats Accepted with the current queue position: the client can
	// tell a queued or slow query from a frozen worker, and the write
	// reveals a client that reset the stream (a reset after close-write is
	// only seen by writes). emit is shared with the backend's sink.
	var emitMu sync.Mutex
	var lastEmit atomic.Int64
	inner := emit
	emit = func(ev *pb.Event) error {
		emitMu.Lock()
		defer emitMu.Unlock()
		lastEmit.Store(time.Now().UnixNano())
		return inner(ev)
	}
	stopBeat := w.heartbeat(t, &lastEmit, emit, cancel)
	defer stopBeat()
	if err := emit(w.accepted(pos)); err != nil {
		if w.adm.wait(canceled(), t) == nil {
			w.adm.release()
		}
		return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
	}
	if err := w.adm.wait(ctx, t); err != nil {
		w.onChange()
		return nil, ctxError(ctx, "waiting in the queue")
	}
	defer func() { w.adm.release(); w.onChange() }()
	admitted := time.Now()

	var end func() (uint64, bool)
	if w.meter != nil {
		end = w.meter.Begin()
	}
	// A failed write means the client is gone: cancel the backend call at
	// once, and count nothing against the backend's health.
	var clientGone atomic.Bool
	output := receipt.NewOutputHash()
	out := func(ev *pb.Event) error {
		output.Add(ev)
		if err := emit(ev); err != nil {
			if errors.Is(err, protocol.ErrEncode) {
				// The backend's output, not the client, is at fault.
				return protocol.Errorf(protocol.CodeBackendError, "backend output cannot be sent: %v", err)
			}
			clientGone.Store(true)
			cancel()
			return err
		}
		return nil
	}
	s := &sink{emit: out, ctx: ctx, tools: len(req.GetTools()) > 0}
	if reuse {
		s.chunk = &pb.Chunk{}
		s.chunkEv = &pb.Event{Kind: &pb.Event_Chunk{Chunk: s.chunk}}
	}
	usage, err := runSafely(ctx, b, req, s)
	var energy uint64
	if end != nil {
		energy, _ = end()
	}
	finished := time.Now()
	if err != nil && clientGone.Load() {
		return nil, protocol.Errorf(protocol.CodeCancelled, "client gone")
	}
	if err != nil {
		perr := mapBackendError(ctx, err)
		var answered *backend.AnsweredError
		switch {
		case errors.As(err, &answered):
			// The server is up and refused this query (backend.AnsweredError).
		case perr.Code == protocol.CodeBackendError, perr.Code == protocol.CodeInternal:
			b.health.Record(health.Failure)
		case perr.Code == protocol.CodeTimeout:
			b.health.Record(health.Timeout)
		}
		return nil, perr
	}
	b.health.Record(health.Success)
	tokens := usage.CompletionTokens
	if tokens == 0 {
		tokens = s.chunks
	}
	ttft := finished.Sub(admitted)
	if !s.first.IsZero() {
		ttft = s.first.Sub(admitted)
	}
	stats.record(ttft, finished.Sub(admitted), tokens)
	if end != nil && energy > 0 {
		w.energy.Record(req.GetModel(), energy, tokens)
	}
	done := &pb.Done{
		Usage: &pb.Usage{PromptTokens: usage.PromptTokens, CompletionTokens: tokens},
		Timing: &pb.Timing{
			QueueMs: uint32(admitted.Sub(start).Milliseconds()),
			TtftMs:  uint32(s.firstOr(finished).Sub(start).Milliseconds()),
			TotalMs: uint32(finished.Sub(start).Milliseconds()),
		},
		EnergyMj:      energy,
		WorkerVersion: w.version,
		Model:         req.GetModel(),
		FinishReason:  s.finishReason(usage.FinishReason),
	}
	w.sign(req, done, output.Sum(), requester)
	return done, nil
}

// sign adds the worker's signed receipt to done. Without a key, or if
// signing fails, the answer goes without one: accounting must not cost
// an answer.
func (w *Worker) sign(req *pb.QueryRequest, done *pb.Done, output []byte, requester peer.ID) {
	if w.key == nil || requester == "" {
		return
	}
	r := receipt.New(req, done, output, w.self, requester, time.Now())
	if err := receipt.Sign(r, w.key); err != nil {
		log.Warnw("receipt not signed", "err", err)
		return
	}
	done.Receipt = r
}

// heartbeat sends Accepted whenever nothing was emitted for a heartbeat
// interval, until the returned stop is called; stop waits for it to end,
// so nothing is emitted after Serve returns. A failed write means the
// client is gone, and cancel stops the query.
func (w *Worker) heartbeat(t *ticket, lastEmit *atomic.Int64, emit Emit, cancel context.CancelFunc) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Tick at a quarter of the interval so a silence of one interval
		// is caught within 1.25 intervals, not 2: the client's bound is
		// 2.5 intervals.
		tick := time.NewTicker(w.beat / 4)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				if time.Since(time.Unix(0, lastEmit.Load())) < w.beat {
					continue
				}
				if emit(w.accepted(w.adm.position(t))) != nil {
					// The client is gone: stop the query now, not at
					// the backend's next output.
					cancel()
					return
				}
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// accepted is the Accepted event (first or heartbeat) at queue position
// pos, with the heartbeat interval the client may hold this worker to.
func (w *Worker) accepted(pos int) *pb.Event {
	return &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{
		QueuePosition: uint32(pos), HeartbeatMs: uint32(w.beat / time.Millisecond)}}}
}

// runSafely calls the backend and turns a panic in it into INTERNAL: a bug
// in one backend must fail one query, not take the node down.
func runSafely(ctx context.Context, b backend.Backend, req *pb.QueryRequest, out backend.Sink) (u backend.Usage, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.Errorw("backend panicked", "backend", b.Name(), "panic", r, "stack", string(debug.Stack()))
			err = protocol.Errorf(protocol.CodeInternal, "the %s backend failed unexpectedly", b.Kind())
		}
	}()
	return b.Run(ctx, req, out)
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// ctxError is the typed error for a context that ended.
func ctxError(ctx context.Context, doing string) *protocol.Error {
	if errors.Is(context.Cause(ctx), errHandBack) {
		return protocol.Errorf(protocol.CodeUnavailable, "worker shutting down; the query was handed back while %s", doing)
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return protocol.Errorf(protocol.CodeTimeout, "deadline exceeded while %s", doing)
	}
	return protocol.Errorf(protocol.CodeCancelled, "cancelled while %s", doing)
}

// mapBackendError types a backend's error; a context end wins over
// whatever the backend made of it.
func mapBackendError(ctx context.Context, err error) *protocol.Error {
	if ctx.Err() != nil {
		return ctxError(ctx, "running the backend")
	}
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return protocol.Errorf(protocol.CodeTimeout, "backend timed out: %v", err)
	}
	return protocol.Errorf(protocol.CodeBackendError, "backend failed: %v", err)
}

// sink turns backend output into events, splitting oversized text and
// refusing oversized media.
type sink struct {
	emit      Emit
	ctx       context.Context
	first     time.Time
	chunks    uint32
	toolCalls bool // the backend called a tool
	tools     bool // the query offers tools: a tool call may answer it
	// chunkEv, when set, is the event every plain text chunk is sent in,
	// its Chunk refilled (serve's reuse).
	chunkEv *pb.Event
	chunk   *pb.Chunk
}

func (s *sink) mark() {
	if s.first.IsZero() {
		s.first = time.Now()
	}
}

func (s *sink) firstOr(t time.Time) time.Time {
	if s.first.IsZero() {
		return t
	}
	return s.first
}

// finishReason is the backend's reason, "tool_calls" when it called tools
// without saying why it stopped, and "" for a reason the protocol does not
// know (a client would take the event for a protocol violation).
func (s *sink) finishReason(r string) string {
	if r == "" && s.toolCalls {
		return protocol.FinishToolCalls
	}
	if !protocol.ValidFinishReason(r) {
		log.Debugw("backend gave an unknown finish reason", "reason", r)
		return ""
	}
	return r
}

// ToolCall passes a tool-call delta on.
func (s *sink) ToolCall(d *pb.ToolCallDelta) error {
	if !s.tools {
		// Passed on, it would be a protocol violation (a routing node
		// bans the worker): a model server's error, not the worker's.
		return protocol.Errorf(protocol.CodeBackendError, "backend made a tool call, but the query offers no tools")
	}
	if d.GetIndex() >= protocol.MaxToolCalls {
		return protocol.Errorf(protocol.CodeTooLarge, "backend made more than %d tool calls", protocol.MaxToolCalls)
	}
	if len(d.GetId()) > protocol.MaxToolCallID || len(d.GetName()) > protocol.MaxToolName {
		return protocol.Errorf(protocol.CodeBackendError, "backend made a tool call with an oversized id or name")
	}
	if d.GetName() != "" && !protocol.ValidToolName(d.GetName()) {
		// The client could not send the call back in its next turn.
		return protocol.Errorf(protocol.CodeBackendError, "backend made a tool call with an invalid name %q", httputil.Clip(d.GetName(), 64))
	}
	s.mark()
	s.toolCalls = true
	args := validUTF8(d.GetArguments())
	for first := true; first || len(args) > 0; first = false {
		n := min(len(args), protocol.MaxChunkText)
		for n < len(args) && n > 0 && args[n]&0xC0 == 0x80 {
			n--
		}
		ev := &pb.ToolCallDelta{Index: d.GetIndex(), Arguments: args[:n]}
		if first {
			ev.Id, ev.Name = validUTF8(d.GetId()), validUTF8(d.GetName())
		}
		if err := s.emit(&pb.Event{Kind: &pb.Event_ToolCall{ToolCall: ev}}); err != nil {
			return err
		}
		args = args[n:]
	}
	return nil
}

// ChunkLogprobs is Chunk with log probabilities, clamped to the range the
// protocol allows (-Inf is sent as MinLogprob, as OpenAI does).
func (s *sink) ChunkLogprobs(text string, lps []*pb.TokenLogprob) error {
	text = validUTF8(text)
	if len(text) > protocol.MaxChunkText || len(lps) > protocol.MaxChunkLogprobs {
		// Too big for one event: the text matters more than its scores.
		return s.Chunk(text)
	}
	clean := make([]*pb.TokenLogprob, 0, len(lps))
	for _, lp := range lps {
		c := &pb.TokenLogprob{Token: clipToken(lp.GetToken()), Logprob: clampLogprob(lp.GetLogprob()), Bytes: clipBytes(lp.GetBytes())}
		for _, t := range lp.GetTop()[:min(len(lp.GetTop()), protocol.MaxTopLogprobs)] {
			c.Top = append(c.Top, &pb.TopLogprob{Token: clipToken(t.GetToken()), Logprob: clampLogprob(t.GetLogprob()), Bytes: clipBytes(t.GetBytes())})
		}
		clean = append(clean, c)
	}
	s.mark()
	s.chunks++
	return s.emit(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text, Logprobs: clean}}})
}

func clampLogprob(f float32) float32 {
	switch {
	case f != f || f < protocol.MinLogprob:
		return protocol.MinLogprob
	case f > 0:
		return 0
	}
	return f
}

// clipToken bounds a log probability's token text. A token may be part
// of a character (its bytes field has them whole), so its text is made
// valid UTF-8 first, as the protocol's strings must be.
func clipToken(t string) string {
	t = validUTF8(t)
	if len(t) <= protocol.MaxLogprobToken {
		return t
	}
	n := protocol.MaxLogprobToken
	for n > 0 && t[n]&0xC0 == 0x80 {
		n--
	}
	return t[:n]
}

func clipBytes(b []byte) []byte { return b[:min(len(b), protocol.MaxLogprobToken)] }

func (s *sink) Chunk(text string) error {
	if text == "" {
		return nil
	}
	text = validUTF8(text)
	s.mark()
	s.chunks++
	for len(text) > 0 {
		n := min(len(text), protocol.MaxChunkText)
		// Do not cut a UTF-8 sequence in two.
		for n < len(text) && n > 0 && text[n]&0xC0 == 0x80 {
			n--
		}
		ev := s.chunkEv
		if ev != nil {
			s.chunk.Text = text[:n]
		} else {
			ev = &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text[:n]}}}
		}
		if err := s.emit(ev); err != nil {
			return err
		}
		text = text[n:]
	}
	return nil
}

// maxMedia leaves room for the frame's other fields.
const maxMedia = protocol.MaxEventFrame - 1024

func (s *sink) Media(mime string, data []byte) error {
	if len(data) > maxMedia {
		return protocol.Errorf(protocol.CodeTooLarge, "backend produced %d bytes of %s, limit %d", len(data), mime, maxMedia)
	}
	s.mark()
	return s.emit(&pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: validUTF8(mime), Data: data}}})
}

// validUTF8 is a backend's text as the protocol may carry it: protobuf
// strings are UTF-8, and an event with other bytes could not be sent at
// all. A backend in this tree decodes JSON, which is UTF-8 already (a
// scan, no copy); one written elsewhere may pass on raw bytes.
func validUTF8(s string) string { return strings.ToValidUTF8(s, "\uFFFD") }

func (s *sink) Embedding(index int, vector []float32) error {
	if len(vector) > protocol.MaxEmbeddingDim {
		return protocol.Errorf(protocol.CodeTooLarge, "embedding of dimension %d, limit %d", len(vector), protocol.MaxEmbeddingDim)
	}
	s.mark()
	return s.emit(&pb.Event{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Index: uint32(index), Vector: vector}}})
}
