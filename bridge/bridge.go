// Package bridge is the HTTP face of a node: the OpenAI-compatible API under
// /v1, the swarm view /api/swarm, /metrics, /healthz, and it mounts the
// WebSocket (/ws, package bridge/ws) and the web UI (/, package
// bridge/webui). It talks to the swarm only through the Swarm interface and
// never shows a network address.
package bridge

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/node/api/hostcheck"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Swarm is what the bridge needs of the node; *router.Router satisfies it.
type Swarm interface {
	// Query routes req to the best capable peer and streams its events to
	// h. It returns the Result or a *protocol.Error. Cancelling ctx cancels
	// the query at the worker.
	Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error)
	// Peers is the peer table, without network addresses.
	Peers() []router.PeerView
	// Models is every model the swarm serves, with its types.
	Models() []router.ModelView
}

// modelFinder looks up one model: with the swarm's own Model
// (*router.Router's builds no view of the other models), else in Models.
// The bridge checks the model of every query twice (404 and the metrics'
// label), and Models sorts every model's view each time.
func modelFinder(s Swarm) func(name string) (router.ModelView, bool) {
	if f, ok := s.(interface {
		Model(name string) (router.ModelView, bool)
	}); ok {
		return f.Model
	}
	return func(name string) (router.ModelView, bool) {
		for _, m := range s.Models() {
			if m.Name == name {
				return m, true
			}
		}
		return router.ModelView{}, false
	}
}

// Server limits for the http.Server that Serve runs.
const (
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 64 << 10
)

// Server is the bridge.
type Server struct {
	cfg     config
	sseBufs *sync.Pool // queue buffers of SSE streams
	swarm   Swarm      // instrumented
	// model is the view of one model the swarm serves (see modelFinder).
	model   func(name string) (router.ModelView, bool)
	log     *logging.ZapEventLogger
	keys    *keySet
	bodies  *bodyBudget
	hosts   *hostcheck.Allow
	cors    *corsPolicy
	metrics *metrics
	reg     *prometheus.Registry
	handler http.Handler
	ws      *ws.Server
	queue   *queue.Queue
	started time.Time
	usage   *usageBook

	// base is the parent of every request context; cancelling it ends
	// streams and WebSockets that outlive the shutdown grace.
	base       context.Context
	cancelBase context.CancelCauseFunc

	mu  sync.Mutex
	srv *http.Server
}

// New builds a bridge in front of s.
func New(s Swarm, opts ...Option) (*Server, error) {
	if s == nil {
		return nil, errors.New("bridge: nil swarm")
	}
	cfg := config{
		maxBody:       DefaultMaxBody,
		maxMedia:      DefaultMaxMedia,
		maxBodyFlight: DefaultMaxBodyInFlight,
		maxAnswer:     DefaultMaxAnswer,
		queryTimeout:  DefaultQueryTimeout,
		keepAlive:     DefaultKeepAlive,
		retryAfter:    DefaultRetryAfter,
		shutdownGrace: DefaultShutdownGrace,
		bodyTimeout:   defaultBodyTimeout,
		queue:         DefaultQueue,
		queuePerCl:    DefaultQueuePerClient,
		queueWait:     DefaultQueueWait,
		queueUpdate:   queue.DefaultUpdateInterval,
		log:           logging.Logger("mtor/bridge"),
	}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("bridge: %w", err)
		}
	}
	if cfg.maxMedia > cfg.maxBody {
		cfg.maxMedia = cfg.maxBody
	}
	if cfg.maxBodyFlight < cfg.maxBody {
		cfg.maxBodyFlight = cfg.maxBody
	}
	hosts, err := hostcheck.New(cfg.hosts...)
	if err != nil {
		return nil, fmt.Errorf("bridge: %w", err)
	}
	reg := cfg.registry
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	srv := &Server{
		cfg:     cfg,
		sseBufs: newSSEBufs(),
		log:     cfg.log,
		keys:    newKeySet(cfg.keys),
		bodies:  newBodyBudget(cfg.maxBodyFlight, cfg.retryAfter),
		hosts:   hosts,
		cors:    newCORSPolicy(cfg.corsOrigins, cfg.trustFwdHost),
		reg:     reg,
		started: time.Now(),
		usage:   newUsageBook(maxUsageClients),
	}
	srv.base, srv.cancelBase = context.WithCancelCause(context.Background())
	q, err := queue.New(
		queue.WithMaxInFlight(cfg.maxInFlight),
		queue.WithCapacity(func() int { return capacityOf(s.Peers()) }),
		queue.WithMaxWaiting(cfg.queue),
		queue.WithMaxWaitingPerClient(cfg.queuePerCl),
		queue.WithMaxWait(cfg.queueWait),
		queue.WithRetryAfter(cfg.retryAfter),
		queue.WithUpdateInterval(cfg.queueUpdate),
		queue.WithLogger(logging.Logger("mtor/bridge/queue")))
	if err != nil {
		return nil, fmt.Errorf("bridge: %w", err)
	}
	srv.queue = q
	wsConns := func() int { return 0 }
	m, err := newMetrics(reg, s, func() int { return wsConns() }, q.Stats, srv.bodies.inUse)
	if err != nil {
		return nil, fmt.Errorf("bridge: metrics: %w", err)
	}
	srv.metrics = m
	// The queue is outside the instrumentation: in_flight and durations
	// are the swarm's, without the wait; refusals are counted as busy.
	srv.model = modelFinder(s)
	inst := &instrumented{Swarm: s, m: m, model: srv.model}
	srv.swarm = &queued{Swarm: inst, q: q, refused: inst.refused, usage: srv.usage}
	mux := http.NewServeMux()
	srv.routes(mux)
	srv.mountUI(mux)
	wsConns = srv.ws.Connections
	srv.handler = writeDeadlines(serverHeader(srv.hostGuard(mux)))
	return srv, nil
}

// writeDeadlines bounds what net/http writes after a handler returns (a
// streamed answer's held tail, the end of a chunked body, a trailer), so
// that a client that stops reading there costs the connection, not a
// goroutine and a socket for good. The server has no WriteTimeout and
// never resets a deadline itself, so each request starts by lifting the
// one its predecessor on the connection left; handlers bound their own
// writes.
func writeDeadlines(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		_ = rc.SetWriteDeadline(time.Time{})
		defer func() { _ = rc.SetWriteDeadline(time.Now().Add(defaultWriteTimeout)) }()
		h.ServeHTTP(w, r)
	})
}

// serverHeader names mtor on every response, so that a node's backend
// auto-detection never takes a bridge for a model server.
func serverHeader(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Server", "mtor")
		h.ServeHTTP(w, r)
	})
}

// routes mounts everything but /ws and /.
func (s *Server) routes(mux *http.ServeMux) {
	v1 := http.NewServeMux()
	v1.HandleFunc("GET /v1/models", s.handleModels)
	v1.HandleFunc("GET /v1/models/{id...}", s.handleModel)
	v1.HandleFunc("POST /v1/chat/completions", s.handleChat)
	v1.HandleFunc("POST /v1/embeddings", s.handleEmbeddings)
	v1.HandleFunc("POST /v1/images/generations", s.handleImages)
	v1.HandleFunc("POST /v1/audio/transcriptions", s.handleTranscription)
	v1.HandleFunc("POST /v1/audio/speech", s.handleSpeech)
	v1.HandleFunc("GET /v1/usage", s.handleUsage)
	v1.HandleFunc("/v1/", s.handleUnknown)
	mux.Handle("/v1/", s.api(withPreference(v1), writeError))
	mux.Handle("/api/swarm", s.cors.wrap(http.HandlerFunc(s.handleSwarm), writeError))
	s.mountOllama(mux)
	mux.HandleFunc("/healthz", s.handleHealth)
	mux.Handle("/metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
}

// Handler is the bridge's whole HTTP surface.
func (s *Server) Handler() http.Handler { return s.handler }

// Swarm is the instrumented swarm the bridge queries through.
func (s *Server) Swarm() Swarm { return s.swarm }

// ListenAndServe listens on addr and serves until ctx ends.
func (s *Server) ListenAndServe(ctx context.Context, addr string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("bridge: listen %s: %w", addr, err)
	}
	return s.Serve(ctx, ln)
}

// Serve serves on ln until ctx ends, then shuts down gracefully: requests in
// flight get the shutdown grace to finish before they are cancelled.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		BaseContext:       func(net.Listener) context.Context { return s.base },
		ErrorLog:          nil,
	}
	s.mu.Lock()
	if s.srv != nil {
		s.mu.Unlock()
		ln.Close()
		return errors.New("bridge: already serving")
	}
	s.srv = hs
	s.mu.Unlock()
	s.log.Infow("bridge serving", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("bridge: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.shutdownGrace)
	defer cancel()
	err := s.Shutdown(sctx)
	<-errc
	return err
}

// Shutdown stops accepting requests, waits for those in flight until ctx
// ends, then cancels the rest (their queries are cancelled at the workers)
// and closes every connection, WebSockets included.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	hs := s.srv
	s.mu.Unlock()
	// Queries still waiting for a slot are refused (busy) at once rather
	// than cut at the end of the grace.
	s.queue.Close()
	if hs == nil {
		s.cancelBase(errBridgeStopping)
		_ = s.ws.Close()
		return nil
	}
	err := hs.Shutdown(ctx)
	// Hijacked connections (WebSockets) are not tracked by Shutdown: their
	// queries get what is left of the grace, then they are closed (status
	// 1001).
	s.ws.Drain(ctx)
	// What still runs is cut now: HTTP requests (their context is base's)
	// and WebSocket queries, together. Each writes why (bridgeStopped,
	// UNAVAILABLE) for up to cutWait; what is open after that is closed.
	s.cancelBase(errBridgeStopping)
	var wg sync.WaitGroup
	wg.Go(func() { _ = s.ws.Close() })
	if err != nil {
		wctx, cancel := context.WithTimeout(context.Background(), cutWait)
		_ = hs.Shutdown(wctx)
		cancel()
		_ = hs.Close()
	}
	wg.Wait()
	if err != nil {
		return fmt.Errorf("bridge: shutdown: %w", err)
	}
	return nil
}

// cutWait bounds how long a stopping bridge waits, once the grace ran
// out, for the requests it cut to write their error (the WebSocket
// server's own bound is the same).
const cutWait = 2 * time.Second

// api wraps an API's handler (OpenAI's, Ollama's) in what every API of the
// bridge shares: CORS, API keys, the body budget, and the client's identity
// for the queue. What they refuse is written by fail, in that API's shape.
func (s *Server) api(h http.Handler, fail errorWriter) http.Handler {
	return s.cors.wrap(s.keys.wrap(s.bodies.wrap(s.cfg.maxBody, s.withClient(h), fail), fail), fail)
}
