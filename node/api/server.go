package api

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"slices"
	"sort"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api/hostcheck"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/api")

// DefaultAddr is where the control API listens unless told otherwise.
const DefaultAddr = "127.0.0.1:5050"

// Limits and defaults of the server.
const (
	// DefaultMaxBody bounds a query body: the largest request frame plus
	// base64's growth and some JSON.
	DefaultMaxBody = protocol.MaxRequestFrame*4/3 + 64<<10
	// DefaultQueryTimeout is a query's deadline when the client names none.
	DefaultQueryTimeout = 2 * time.Minute
	// MaxQueryTimeout caps timeout_ms at what a worker grants a query.
	MaxQueryTimeout = worker.MaxDeadline
	// writeTimeout bounds each write to a client; a client that stops
	// reading for this long is dropped and its query cancelled.
	writeTimeout = 30 * time.Second
)

// Node is what the API needs to know about the node it serves.
type Node interface {
	ID() peer.ID
	SwarmName() string
	Addrs() []multiaddr.Multiaddr
	JoinLine() string
}

// Reachable is a Node that knows whether peers outside its network can
// dial it (*node.Node is one); /v1/id then reports it.
type Reachable interface {
	Reachability() node.ReachabilityInfo
}

// Router is the part of the router the API uses; *router.Router has it.
type Router interface {
	Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error)
	Peers() []router.PeerView
	Models() []router.ModelView
}

// Server is the control API's HTTP server.
type Server struct {
	node           Node
	router         Router
	version        string
	allowRemote    bool
	maxBody        int64
	defaultTimeout time.Duration
	http           *http.Server
	// base is every request's parent context; Shutdown cancels it with
	// errNodeStopping once the grace has run out.
	base     context.Context
	stopBase context.CancelCauseFunc
}

// errNodeStopping is the cause a stopping node cancels the API's requests
// with, so that a query cut by the stop is told apart from one whose
// client left: its client is still there to read why.
var errNodeStopping = errors.New("the node is stopping")

// cutWait bounds how long Shutdown waits, once the grace ran out, for
// the queries it cut to write their error event.
const cutWait = 2 * time.Second

// Option configures a Server.
type Option func(*Server)

// WithAllowRemote lets clients from non-loopback addresses in. Only for an
// API the operator bound to a non-loopback address on purpose.
func WithAllowRemote(on bool) Option { return func(s *Server) { s.allowRemote = on } }

// WithVersion sets the version reported by /v1/id.
func WithVersion(v string) Option { return func(s *Server) { s.version = v } }

// WithMaxBody bounds request bodies (bytes).
func WithMaxBody(n int64) Option { return func(s *Server) { s.maxBody = n } }

// WithDefaultQueryTimeout sets the deadline of queries that name none.
func WithDefaultQueryTimeout(d time.Duration) Option {
	return func(s *Server) { s.defaultTimeout = d }
}

// NewServer builds the API for a node and its router.
func NewServer(n Node, r Router, opts ...Option) *Server {
	s := &Server{
		node:           n,
		router:         r,
		version:        "dev",
		maxBody:        DefaultMaxBody,
		defaultTimeout: DefaultQueryTimeout,
	}
	for _, o := range opts {
		o(s)
	}
	s.base, s.stopBase = context.WithCancelCause(context.Background())
	s.http = &http.Server{
		Handler:           s.Handler(),
		BaseContext:       func(net.Listener) context.Context { return s.base },
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute, // the whole request, body included
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		// No WriteTimeout: query streams live long; every write sets
		// its own deadline instead.
	}
	return s
}

// Serve serves the API on ln until Shutdown. It returns nil after Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	err := s.http.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting connections and waits for running requests
// (query streams included) until ctx ends. Then it cancels the queries
// still running, gives each up to cutWait to end its stream with an
// UNAVAILABLE error event, and closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.http.Shutdown(ctx)
	s.stopBase(errNodeStopping)
	if err != nil {
		wctx, cancel := context.WithTimeout(context.Background(), cutWait)
		_ = s.http.Shutdown(wctx)
		cancel()
		_ = s.http.Close()
	}
	return err
}

// Handler is the API as an http.Handler, with its access checks.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/id", s.handleID)
	mux.HandleFunc("GET /v1/peers", s.handlePeers)
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("POST /v1/query", s.handleQuery)
	mux.HandleFunc("GET /v1/ledger", s.handleLedger)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, ErrorBody{Error: ErrorEvent{Code: CodeNotFound,
			Message: fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path)}})
	})
	return s.guard(mux)
}

// guard refuses what the control API must never serve: clients from other
// machines (unless allowed), and browsers. A web page could otherwise
// reach 127.0.0.1:5050 from the user's own browser (cross-site requests,
// DNS rebinding); the CLI never sends an Origin header and always names
// the loopback address it dials.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.allowRemote {
			if !hostcheck.LoopbackAddr(r.RemoteAddr) {
				writeForbidden(w, fmt.Sprintf("the control API serves only this machine (client %s)", r.RemoteAddr))
				return
			}
			if !hostcheck.Loopback(r.Host) {
				writeForbidden(w, fmt.Sprintf("host %q is not a loopback address", r.Host))
				return
			}
		}
		// Browsers send Sec-Fetch-Site on every request, same-origin ones
		// too: a page that rebound its own name to this node's address
		// (DNS rebinding, which the Host check above stops only on
		// loopback) sends no Origin with a same-origin GET, but that.
		if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") != "" {
			writeForbidden(w, "browsers are not served by the control API; use the bridge (--bridge)")
			return
		}
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(writeTimeout))
		next.ServeHTTP(w, r)
	})
}

func (s *Server) handleID(w http.ResponseWriter, r *http.Request) {
	addrs := s.node.Addrs()
	info := IDInfo{
		Peer:    s.node.ID().String(),
		Swarm:   s.node.SwarmName(),
		Version: s.version,
		Addrs:   make([]string, 0, len(addrs)),
		Join:    s.node.JoinLine(),
	}
	for _, a := range addrs {
		info.Addrs = append(info.Addrs, a.String())
	}
	info.Roles, info.Backends = []string{}, []node.BackendState{}
	if st, ok := s.state(); ok {
		info.Roles = append(info.Roles, st.Roles...)
		info.Reachability = st.Reachability
		info.ConnectedPeers, info.Connections, info.RedundantClosed = st.ConnectedPeers, st.Connections, st.RedundantClosed
		info.Paths = PathsView{Direct: st.Paths.Direct, HolePunched: st.Paths.HolePunched, Relayed: st.Paths.Relayed}
		info.SwarmPeers = st.SwarmPeers
		info.Joining, info.JoinError = st.Joining, st.JoinError
		info.Backends = append(info.Backends, st.Backends...)
		info.Gossip = &st.Gossip
	}
	if rn, ok := s.node.(Reachable); ok {
		ri := rn.Reachability()
		info.ReachabilityStatus, info.ReachabilityHow = ri.Status.String(), ri.How
		for _, r := range ri.Relays {
			rv := RelayView{Peer: r.Peer.String(), Addrs: []string{}, ExpiresMs: r.Expires.UnixMilli()}
			for _, a := range r.Addrs {
				rv.Addrs = append(rv.Addrs, a.String())
			}
			info.Relays = append(info.Relays, rv)
		}
	}
	writeJSON(w, http.StatusOK, info)
}

// stater is a Node that can tell its state; *node.Node is one.
type stater interface{ State() node.State }

func (s *Server) state() (node.State, bool) {
	if n, ok := s.node.(stater); ok {
		return n.State(), true
	}
	return node.State{}, false
}

// handlePeers lists the router's workers, marks relays, and adds this
// node's own row (with its backends' states, so that an operator sees why
// it serves nothing) and the relays that serve no model.
func (s *Server) handlePeers(w http.ResponseWriter, r *http.Request) {
	views := s.router.Peers()
	st, hasState := s.state()
	out := make([]Peer, 0, len(views)+1)
	self := ""
	if s.node != nil {
		self = s.node.ID().String()
	}
	seen := map[string]bool{}
	for _, v := range views {
		p := Peer{PeerView: v, Relay: slices.Contains(v.Roles, "relay")}
		if v.Peer == self {
			p.Self = true
			p.Backends = st.Backends
		}
		seen[v.Peer] = true
		out = append(out, p)
	}
	if hasState && !seen[self] {
		out = append(out, Peer{PeerView: router.PeerView{Peer: self, Self: true, Version: s.version,
			Roles: append([]string{}, st.Roles...), Models: []router.ModelStat{}, GPUs: []router.GPUView{}},
			Relay: slices.Contains(st.Roles, "relay"), Backends: st.Backends})
	}
	for _, rp := range st.Relays {
		if seen[rp.Peer.String()] {
			continue
		}
		out = append(out, Peer{PeerView: router.PeerView{Peer: rp.Peer.String(), Roles: rp.Roles,
			Models: []router.ModelStat{}, GPUs: []router.GPUView{}, AgeMs: rp.Age.Milliseconds()}, Relay: true})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	writeJSON(w, http.StatusOK, out)
}

// ledgered is a Node that keeps a ledger; *node.Node is one.
type ledgered interface{ Ledger() *ledger.Ledger }

// handleLedger shows what this node consumed from and served to each
// peer, from checked receipts.
func (s *Server) handleLedger(w http.ResponseWriter, r *http.Request) {
	n, ok := s.node.(ledgered)
	if !ok || n.Ledger() == nil {
		writeJSON(w, http.StatusNotFound, ErrorBody{Error: ErrorEvent{Code: CodeNotFound, Message: "this node keeps no ledger"}})
		return
	}
	writeJSON(w, http.StatusOK, n.Ledger().Snapshot())
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	models := s.router.Models()
	if models == nil {
		models = []router.ModelView{}
	}
	writeJSON(w, http.StatusOK, models)
}

func (s *Server) handleQuery(w http.ResponseWriter, r *http.Request) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		writeError(w, http.StatusUnsupportedMediaType, protocol.Errorf(protocol.CodeBadRequest, "Content-Type must be application/json"))
		return
	}
	var q QueryRequest
	if status, err := decodeBody(w, r, s.maxBody, &q); err != nil {
		writeError(w, status, protocol.AsError(err))
		return
	}
	req, timeout, err := q.Proto(s.defaultTimeout)
	if err != nil {
		writeError(w, http.StatusBadRequest, protocol.AsError(err))
		return
	}
	pref, err := q.Preference()
	if err != nil {
		writeError(w, http.StatusBadRequest, protocol.AsError(err))
		return
	}
	ctx, cancel := context.WithTimeout(router.WithEnergyPreference(r.Context(), pref), timeout)
	defer cancel()

	out := &eventWriter{w: w, rc: http.NewResponseController(w)}
	done, err := Run(ctx, s.router, req, out.write)
	if err != nil {
		pe := protocol.AsError(err)
		switch {
		case errors.Is(context.Cause(r.Context()), errNodeStopping):
			pe = protocol.Errorf(protocol.CodeUnavailable, "the node is stopping and its grace period ran out before the answer's end; ask again (another node, or this one once restarted)")
		case r.Context().Err() != nil:
			log.Debugw("query cancelled by the client", "model", q.Model)
			return
		}
		log.Debugw("query failed", "model", q.Model, "err", pe)
		_ = out.write(&Event{Event: EventError, ErrorEvent: errorEvent(pe)})
		return
	}
	_ = out.write(&Event{Event: EventDone, DoneEvent: done})
}

// Run sends a wire request through r, as POST /v1/query does, calling
// onEvent for each streamed event. It returns the done event or a
// *protocol.Error. A non-nil return from onEvent cancels the query.
func Run(ctx context.Context, r Router, req *pb.QueryRequest, onEvent func(*Event) error) (*DoneEvent, error) {
	// Every consumer of this stream can take output back (it gets a
	// restart event), so a worker dying mid-answer loses no query.
	res, err := r.Query(router.WithRestart(ctx), req, func(ev *pb.Event) error {
		if ev == nil {
			if onEvent != nil {
				return onEvent(&Event{Event: EventRestart})
			}
			return nil
		}
		if e := eventFromProto(ev); e != nil && onEvent != nil {
			return onEvent(e)
		}
		return nil
	})
	if err != nil {
		return nil, protocol.AsError(err)
	}
	if res == nil || res.Done == nil {
		return nil, protocol.Errorf(protocol.CodeInternal, "the router returned no result")
	}
	return doneEvent(res), nil
}

// Preference is Prefer parsed; a bad value is a BAD_REQUEST error.
func (q *QueryRequest) Preference() (router.EnergyPreference, error) {
	p, err := router.ParseEnergyPreference(q.Prefer)
	if err != nil {
		return p, protocol.Errorf(protocol.CodeBadRequest, "prefer: %v", err)
	}
	return p, nil
}

// Proto turns the JSON request into a wire request with a fresh id and an
// absolute deadline, validated as a worker would. It also returns the
// query's timeout: timeout_ms, or defaultTimeout when that is 0.
func (q *QueryRequest) Proto(defaultTimeout time.Duration) (*pb.QueryRequest, time.Duration, error) {
	typ := pb.QueryType_QUERY_TYPE_CHAT
	if q.Type != "" {
		t, err := protocol.ParseType(q.Type)
		if err != nil {
			return nil, 0, err
		}
		typ = t
	}
	timeout := defaultTimeout
	switch {
	case q.TimeoutMs < 0:
		return nil, 0, protocol.Errorf(protocol.CodeBadRequest, "timeout_ms must not be negative")
	case q.TimeoutMs > MaxQueryTimeout.Milliseconds():
		return nil, 0, protocol.Errorf(protocol.CodeBadRequest, "timeout_ms %d over the limit of %d", q.TimeoutMs, MaxQueryTimeout.Milliseconds())
	case q.TimeoutMs > 0:
		timeout = time.Duration(q.TimeoutMs) * time.Millisecond
	}
	id := make([]byte, protocol.IDLen)
	if _, err := rand.Read(id); err != nil {
		return nil, 0, fmt.Errorf("query id: %w", err)
	}
	req := &pb.QueryRequest{
		Id:             id,
		Type:           typ,
		Model:          q.Model,
		Prompt:         q.Prompt,
		Attachments:    attachmentsToProto(q.Attachments),
		Inputs:         q.Inputs,
		Priority:       q.Priority,
		DeadlineUnixMs: time.Now().Add(timeout).UnixMilli(),
	}
	for _, m := range q.Messages {
		req.Messages = append(req.Messages, &pb.Message{Role: m.Role, Content: m.Content, Attachments: attachmentsToProto(m.Attachments)})
	}
	if p := q.Params; p != nil {
		req.Params = &pb.Params{
			MaxTokens: p.MaxTokens, Temperature: p.Temperature, TopP: p.TopP, Stop: p.Stop,
			Seed: p.Seed, Size: p.Size, Voice: p.Voice, Format: p.Format,
		}
	}
	if err := protocol.ValidateRequest(req); err != nil {
		return nil, 0, err
	}
	return req, timeout, nil
}

func attachmentsToProto(as []Attachment) []*pb.Attachment {
	var out []*pb.Attachment
	for _, a := range as {
		out = append(out, &pb.Attachment{Mime: a.MIME, Data: a.Data})
	}
	return out
}

// eventFromProto converts the streamed events; Done and Error come back
// from Router.Query instead and are ignored here.
func eventFromProto(ev *pb.Event) *Event {
	switch k := ev.GetKind().(type) {
	case *pb.Event_Accepted:
		return &Event{Event: EventAccepted, AcceptedEvent: &AcceptedEvent{QueuePosition: k.Accepted.GetQueuePosition()}}
	case *pb.Event_Chunk:
		return &Event{Event: EventChunk, ChunkEvent: &ChunkEvent{Text: k.Chunk.GetText()}}
	case *pb.Event_Media:
		return &Event{Event: EventMedia, MediaEvent: &MediaEvent{MIME: k.Media.GetMime(), Data: k.Media.GetData()}}
	case *pb.Event_Embedding:
		return &Event{Event: EventEmbedding, EmbeddingEvent: &EmbeddingEvent{Index: k.Embedding.GetIndex(), Vector: k.Embedding.GetVector()}}
	}
	return nil
}

func doneEvent(res *router.Result) *DoneEvent {
	d := res.Done
	return &DoneEvent{
		Peer:      res.Peer.String(),
		Local:     res.Local,
		Attempts:  res.Attempts,
		Continued: res.Continued,
		Model:     d.GetModel(),
		Usage: Usage{
			PromptTokens:     d.GetUsage().GetPromptTokens(),
			CompletionTokens: d.GetUsage().GetCompletionTokens(),
		},
		TTFTMs:        res.TTFTMs,
		TotalMs:       res.TotalMs,
		QueueMs:       d.GetTiming().GetQueueMs(),
		WorkerTTFTMs:  d.GetTiming().GetTtftMs(),
		WorkerTotalMs: d.GetTiming().GetTotalMs(),
		EnergyMJ:      d.GetEnergyMj(),
		WorkerVersion: d.GetWorkerVersion(),
		Receipt:       receiptBytes(d.GetReceipt()),
	}
}

// receiptBytes is the receipt's protobuf encoding, nil without one.
func receiptBytes(r *pb.Receipt) []byte {
	if r == nil {
		return nil
	}
	b, err := proto.Marshal(r)
	if err != nil {
		return nil
	}
	return b
}

// eventWriter writes NDJSON events, flushing each so that tokens reach the
// client as they are made. The status line goes out with the first event.
type eventWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
}

func (e *eventWriter) write(ev *Event) error {
	if !e.started {
		h := e.w.Header()
		h.Set("Content-Type", "application/x-ndjson")
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		e.w.WriteHeader(http.StatusOK)
		e.started = true
	}
	_ = e.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	b, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	if _, err := e.w.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write event: %w", err)
	}
	if err := e.rc.Flush(); err != nil {
		return fmt.Errorf("flush event: %w", err)
	}
	return nil
}

// decodeBody reads one JSON value, refusing unknown fields, trailing data
// and bodies over max. It returns the HTTP status for a failure.
func decodeBody(w http.ResponseWriter, r *http.Request, max int64, v any) (int, error) {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, max))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return http.StatusRequestEntityTooLarge, protocol.Errorf(protocol.CodeTooLarge, "request body over %d bytes", mbe.Limit)
		}
		return http.StatusBadRequest, protocol.Errorf(protocol.CodeBadRequest, "invalid JSON body: %v", err)
	}
	if err := dec.Decode(&struct{}{}); !errors.Is(err, io.EOF) {
		return http.StatusBadRequest, protocol.Errorf(protocol.CodeBadRequest, "invalid JSON body: trailing data after the request object")
	}
	return 0, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		log.Errorw("encode response", "err", err)
		status, b = http.StatusInternalServerError, []byte(`{"error":{"code":"INTERNAL","message":"encode response"}}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// writeForbidden refuses a client the API does not serve. Its code is the
// API's own FORBIDDEN: no query was looked at, so no protocol code fits.
func writeForbidden(w http.ResponseWriter, msg string) {
	writeJSON(w, http.StatusForbidden, ErrorBody{Error: ErrorEvent{Code: CodeForbidden, Message: msg}})
}

func writeError(w http.ResponseWriter, status int, e *protocol.Error) {
	writeJSON(w, status, ErrorBody{Error: *errorEvent(e)})
}
