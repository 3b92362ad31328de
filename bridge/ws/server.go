// Package ws serves the bridge's WebSocket endpoint (/ws): the message set
// of the seed system's browser client (RENTAHAL script.js), which works
// against it unchanged, plus mtor's streaming additions (query_chunk,
// query_started, query_done, cancel). docs/bridge.md describes every
// message.
package ws

import (
	"context"
	"encoding/json"
	"maps"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/mtor-swarm/mtor/bridge/internal/sameorigin"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Swarm is what the WebSocket server needs from the node: see the bridge
// contract. *router.Router satisfies it.
type Swarm interface {
	Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error)
	Peers() []router.PeerView
	Models() []router.ModelView
}

// Server is the /ws handler.
type Server struct {
	swarm Swarm
	cfg   config

	mu       sync.Mutex
	conns    map[*conn]struct{}
	closed   bool
	draining bool // new queries are refused: the server is stopping
	// active counts the queries begun and not yet answered, over all
	// connections; idle, made by Drain, is closed when it reaches 0.
	active   int
	idle     chan struct{}
	stopPoll context.CancelFunc // running model poller, nil when no client
	lastSig  string
	// highWater is the most connections open since the last collection a
	// crowd's leaving asked for.
	highWater int

	catMu sync.Mutex // guards the catalog snapshot
	cat   *catalog
	catAt time.Time
	// maxQueued is the most bytes any closed connection had queued (tests)
	maxQueued int64
}

// New builds the WebSocket server for s.
func New(s Swarm, opts ...Option) *Server {
	cfg := defaults()
	for _, o := range opts {
		o(&cfg)
	}
	return &Server{swarm: s, cfg: cfg, conns: map[*conn]struct{}{}}
}

// Connections is the number of open WebSocket connections.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Drain refuses new queries (UNAVAILABLE, with a retry hint) and waits
// until the queries the clients have running end and their answers are
// written out, or ctx ends: the grace a stopping bridge gives its
// queries, which http.Server.Shutdown does not give hijacked
// connections. Close then disconnects the clients.
func (s *Server) Drain(ctx context.Context) {
	s.mu.Lock()
	s.draining = true
	var idle chan struct{}
	if s.active > 0 {
		if s.idle == nil {
			s.idle = make(chan struct{})
		}
		idle = s.idle
	}
	s.mu.Unlock()
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			return
		}
	}
	// The answers are queued; Close would drop what is not yet written.
	s.mu.Lock()
	conns := slices.Collect(maps.Keys(s.conns))
	s.mu.Unlock()
	for _, c := range conns {
		c.flushed(ctx)
	}
}

// beginQuery counts a query in, unless the server is draining: then it
// is to be refused. The check and the count are one step, so that Drain
// cannot miss a query that passed the check.
func (s *Server) beginQuery() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.active++
	return true
}

// endQuery counts a query out (answered or refused), and wakes Drain at
// the last.
func (s *Server) endQuery() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active--; s.active == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

// Draining reports whether Drain has begun: new queries are refused.
func (s *Server) Draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

// closeWait bounds how long Close waits for the queries it stops to
// write their errors out before it disconnects the clients.
const closeWait = 2 * time.Second

// Close disconnects every client (status 1001, going away) and refuses new
// ones. Hijacked connections outlive http.Server.Shutdown, so the bridge
// calls this when it stops. A query still running (the grace ran out) is
// cancelled at its worker and ends with an UNAVAILABLE error, written
// before the close, so that a client with several queries on one
// connection learns which went unanswered.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed, s.draining = true, true
	conns := slices.Collect(maps.Keys(s.conns))
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), closeWait)
	defer cancel()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			c.stopQueries(ctx)
			c.shutdown(websocket.StatusGoingAway, "server shutting down")
		})
	}
	wg.Wait()
	return nil
}

// ServeHTTP upgrades the request to a WebSocket and serves it until it
// closes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	full, closed := len(s.conns) >= s.cfg.maxConns, s.closed
	s.mu.Unlock()
	if closed {
		http.Error(w, "server shutting down", http.StatusServiceUnavailable)
		return
	}
	if full {
		w.Header().Set("Retry-After", "5")
		http.Error(w, "too many WebSocket connections", http.StatusServiceUnavailable)
		return
	}
	guid := guidFromCookie(r)
	// Accept answers 403 itself when the Origin is neither the request's
	// host nor one of the allowed patterns. It knows nothing of
	// X-Forwarded-Host, so a same-origin page is recognised here first.
	// No permessage-deflate: its compressor state costs far more per
	// connection than the small JSON messages would gain.
	ao := &websocket.AcceptOptions{OriginPatterns: s.cfg.origins, CompressionMode: websocket.CompressionDisabled}
	if sameorigin.Match(r.Header.Get("Origin"), r, s.cfg.trustFwdHost) {
		ao.InsecureSkipVerify = true // the origin is checked: it is our own
	}
	wc, err := websocket.Accept(w, r, ao)
	if err != nil {
		s.cfg.log.Debugw("websocket accept failed", "err", err, "origin", r.Header.Get("Origin"))
		return
	}
	wc.SetReadLimit(s.cfg.maxMessage)
	c := newConn(s, wc, guid, r.URL.Query().Get("format") == "text")
	if !s.add(c) {
		wc.Close(websocket.StatusTryAgainLater, "too many connections")
		return
	}
	defer s.remove(c)
	c.serve()
}

func (s *Server) add(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.conns) >= s.cfg.maxConns {
		return false
	}
	s.conns[c] = struct{}{}
	s.highWater = max(s.highWater, len(s.conns))
	if s.stopPoll == nil {
		ctx, cancel := context.WithCancel(context.Background())
		s.stopPoll = cancel
		go s.pollModels(ctx)
	}
	return true
}

func (s *Server) remove(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	if len(s.conns) <= s.highWater/4 && s.highWater >= releaseMin {
		// A crowd left. The heap goal the GC set while it was here keeps
		// its memory mapped until the next collection, which an idle
		// bridge may not start for two minutes; one collection now lets
		// the goal follow the smaller live heap, and the runtime's
		// background scavenger then returns the rest to the OS.
		s.highWater = len(s.conns)
		go runtime.GC()
	}
	if len(s.conns) == 0 {
		// Go maps never shrink: a new one lets a crowd's buckets go.
		s.conns = map[*conn]struct{}{}
	}
	s.maxQueued = max(s.maxQueued, c.maxQueue.Load())
	if len(s.conns) == 0 && s.stopPoll != nil {
		s.stopPoll()
		s.stopPoll = nil
	}
}

// releaseMin is the smallest crowd whose leaving asks for a collection.
const releaseMin = 256

// catalogTTL is how long a catalog snapshot is reused: a burst of
// thousands of queries then reads the peer table a few times, not once
// each (the router's lock is on the query path too).
const catalogTTL = 100 * time.Millisecond

// catalog snapshots the swarm's models; a snapshot is immutable, so one
// may serve many queries.
func (s *Server) catalog() *catalog {
	s.catMu.Lock()
	defer s.catMu.Unlock()
	if s.cat != nil && time.Since(s.catAt) < catalogTTL {
		return s.cat
	}
	s.cat, s.catAt = newCatalog(s.swarm.Models(), s.swarm.Peers(), time.Now()), time.Now()
	return s.cat
}

// pollModels pushes worker_update to every client when the swarm's models
// change. It runs while at least one client is connected.
func (s *Server) pollModels(ctx context.Context) {
	t := time.NewTicker(s.cfg.modelPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cat := s.catalog()
		sig := cat.signature()
		s.mu.Lock()
		changed := sig != s.lastSig
		s.lastSig = sig
		conns := slices.Collect(maps.Keys(s.conns))
		s.mu.Unlock()
		if !changed {
			continue
		}
		b, err := json.Marshal(workerUpdateMsg{Type: "worker_update", Workers: cat.entries})
		if err != nil {
			s.cfg.log.Errorw("marshal worker_update", "err", err)
			continue
		}
		for _, c := range conns {
			// Never waits for one client's queue: a client too far
			// behind for this one gets the next change's list.
			c.enqueue(b, false)
		}
	}
}

// noteSignature records what a new client was just sent, so the poller does
// not push the same list again.
func (s *Server) noteSignature(sig string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastSig == "" {
		s.lastSig = sig
	}
}
