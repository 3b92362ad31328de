package bridge

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// testTimeout bounds every wait in these tests; generous for a loaded
// 2-core machine.
const testTimeout = 60 * time.Second

// runEnd is how one backend call ended, as the worker's backend saw it.
type runEnd struct {
	model  string
	prompt string
	err    error
	ctxErr error // the backend call's context when it returned
}

// observed wraps a real backend and reports how each call ended: the
// "worker side" of the cancellation tests.
type observed struct {
	backend.Backend
	starts chan string // prompts of calls as they begin
	ends   chan runEnd
}

func (o *observed) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	prompt := req.GetPrompt()
	if n := len(req.GetMessages()); n > 0 {
		prompt = req.GetMessages()[n-1].GetContent()
	}
	select {
	case o.starts <- prompt:
	default:
	}
	u, err := o.Backend.Run(ctx, req, out)
	select {
	case o.ends <- runEnd{model: req.GetModel(), prompt: prompt, err: err, ctxErr: ctx.Err()}:
	default: // nobody watching; never block the worker
	}
	return u, err
}

// hooks watch one worker: its backend calls as they start and end, and
// its admission counts.
type hooks struct {
	w      *worker.Worker
	starts chan string
	ends   chan runEnd
	// others are ends waitEnd read while waiting for another call's,
	// kept for a later wait (the test's goroutine only).
	others []runEnd
}

func newHooks() *hooks {
	return &hooks{starts: make(chan string, 256), ends: make(chan runEnd, 256)}
}

// backends are the demo backend serving "demo" (fast) and "slow" (30 ms
// between words, for cancellation tests), both observed.
func (h *hooks) backends(label string) []backend.Backend {
	return []backend.Backend{
		&observed{Backend: demo.New(label, demo.WithDelay(time.Millisecond)), starts: h.starts, ends: h.ends},
		&observed{Backend: demo.New(label, demo.WithModel("slow"), demo.WithDelay(30*time.Millisecond)), starts: h.starts, ends: h.ends},
	}
}

// localSwarm is the bridge's Swarm built from the node's real worker
// (admission, queue, sink) and the real demo backend, in-process, without
// the network: quick, for the many endpoint tests. The integration tests
// use realSwarm.
type localSwarm struct {
	*hooks
	self peer.ID
}

func newLocalSwarm(t *testing.T, opts ...worker.Option) *localSwarm {
	t.Helper()
	h := newHooks()
	h.w = worker.New(h.backends("test"), append([]worker.Option{worker.WithVersion("test")}, opts...)...)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	h.w.Refresh(ctx)
	if len(h.w.Capabilities()) != 2 {
		t.Fatalf("worker serves %d models, want 2", len(h.w.Capabilities()))
	}
	return &localSwarm{hooks: h, self: testPeerID(t)}
}

// realSwarm starts real nodes on loopback (node/swarmtest): a bootstrap,
// one worker serving the observed demo models, and a client node without
// backends whose router is the bridge's Swarm, so that every query crosses
// a libp2p stream to the worker.
func newRealSwarm(t *testing.T) (*router.Router, *hooks, peer.ID) {
	t.Helper()
	h := newHooks()
	sw := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1),
		swarmtest.Backends(func(_ int, label string) []backend.Backend { return h.backends(label) }))
	h.w = sw.Workers[0].Worker()
	r := sw.Clients[0].Router()
	deadline := time.Now().Add(testTimeout)
	for len(r.Models()) < 2 { // the announcement carries both models
		if time.Now().After(deadline) {
			t.Fatalf("client sees models %v", r.Models())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r, h, sw.Workers[0].ID()
}

func testPeerID(t *testing.T) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (s *localSwarm) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	start := time.Now()
	var first time.Time
	done, err := s.w.Serve(ctx, req, func(ev *pb.Event) error {
		if _, ok := ev.GetKind().(*pb.Event_Accepted); !ok && first.IsZero() {
			first = time.Now()
		}
		if err := h(ev); err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if first.IsZero() {
		first = time.Now()
	}
	return &router.Result{Peer: s.self, Local: true, Attempts: 1, Done: done,
		TTFTMs: uint32(first.Sub(start).Milliseconds()), TotalMs: uint32(time.Since(start).Milliseconds())}, nil
}

func (s *localSwarm) Models() []router.ModelView {
	var out []router.ModelView
	for _, c := range s.w.Capabilities() {
		v := router.ModelView{Name: c.Name, Peers: 1}
		for _, t := range c.Types {
			v.Types = append(v.Types, protocol.TypeName(t))
		}
		out = append(out, v)
	}
	return out
}

func (s *localSwarm) Peers() []router.PeerView {
	running, queued, maxc, _ := s.w.Load()
	v := router.PeerView{Peer: s.self.String(), Self: true, Version: "test", Roles: []string{"worker", "bridge"},
		InFlight: uint32(running), Queued: uint32(queued), MaxConcurrency: uint32(maxc), Health: s.w.Health(),
		GPUs: []router.GPUView{}, Breaker: "closed"}
	for _, c := range s.w.Capabilities() {
		m := router.ModelStat{Name: c.Name, Backend: c.Backend}
		for _, t := range c.Types {
			m.Types = append(m.Types, protocol.TypeName(t))
		}
		v.Models = append(v.Models, m)
	}
	return []router.PeerView{v}
}

// running is the worker's count of queries in progress.
func (s *hooks) running() int {
	r, q, _, _ := s.w.Load()
	return r + q
}

// waitStart waits until, for each marker, a backend call whose prompt
// contains it has begun, in any order.
func (s *hooks) waitStart(t *testing.T, markers ...string) {
	t.Helper()
	left := slices.Clone(markers)
	deadline := time.After(testTimeout)
	for len(left) > 0 {
		select {
		case p := <-s.starts:
			left = slices.DeleteFunc(left, func(m string) bool { return strings.Contains(p, m) })
		case <-deadline:
			t.Fatalf("the worker never started the backend call for %q", left)
		}
	}
}

// waitEnd waits for the backend call whose prompt contains marker to end.
func (s *hooks) waitEnd(t *testing.T, marker string) runEnd {
	t.Helper()
	for i, e := range s.others {
		if strings.Contains(e.prompt, marker) {
			s.others = slices.Delete(s.others, i, i+1)
			return e
		}
	}
	deadline := time.After(testTimeout)
	for {
		select {
		case e := <-s.ends:
			if strings.Contains(e.prompt, marker) {
				return e
			}
			if len(s.others) < cap(s.ends) {
				s.others = append(s.others, e)
			}
		case <-deadline:
			t.Fatalf("the worker's backend call for %q never ended", marker)
		}
	}
}

// waitIdle waits for the worker to have nothing running or queued.
func (s *hooks) waitIdle(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := s.w.Wait(ctx); err != nil {
		t.Fatalf("worker still busy: %v", err)
	}
	if n := s.running(); n != 0 {
		t.Fatalf("worker reports %d queries after Wait", n)
	}
}

// fakeSwarm is a fake Swarm for the error paths: it emits events and
// returns err, so that every code the router can return is covered.
type fakeSwarm struct {
	models []router.ModelView
	events []*pb.Event
	err    error

	mu      sync.Mutex
	queries []*pb.QueryRequest
}

func (f *fakeSwarm) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	f.mu.Lock()
	f.queries = append(f.queries, req)
	f.mu.Unlock()
	for _, ev := range f.events {
		if err := h(ev); err != nil {
			return nil, protocol.Errorf(protocol.CodeCancelled, "client gone: %v", err)
		}
	}
	if f.err != nil {
		return nil, f.err
	}
	return &router.Result{Peer: "", Attempts: 1, Done: &pb.Done{}}, nil
}

func (f *fakeSwarm) Models() []router.ModelView {
	if f.models != nil {
		return f.models
	}
	return []router.ModelView{{Name: "demo", Types: []string{"chat", "vision", "imagine", "stt", "tts", "embed"}, Peers: 1}}
}

func (f *fakeSwarm) Peers() []router.PeerView { return nil }

// startBridge serves a bridge for s on 127.0.0.1:0 with Serve and returns
// its base URL; the server is shut down at the end of the test.
func startBridge(t *testing.T, s Swarm, opts ...Option) (*Server, string) {
	t.Helper()
	opts = append([]Option{WithRegistry(prometheus.NewRegistry())}, opts...)
	b, err := New(s, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil && !errors.Is(err, http.ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(testTimeout):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return b, "http://" + ln.Addr().String()
}
