package worker

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func req(prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: prompt}
}

func newWorker(t *testing.T, b backend.Backend, opts ...Option) *Worker {
	t.Helper()
	w := New([]backend.Backend{b}, opts...)
	w.Refresh(context.Background())
	if len(w.Capabilities()) == 0 {
		t.Fatal("worker has no models after Refresh")
	}
	return w
}

func TestAdmissionQueueOrderAndBusy(t *testing.T) {
	a := newAdmission(1, 2)
	t0, pos, err := a.enter(0, 0)
	if err != nil || pos != 0 {
		t.Fatalf("first: pos %d err %v", pos, err)
	}
	low, pos, _ := a.enter(-1, 0)
	if pos != 1 {
		t.Fatalf("low pos = %d, want 1", pos)
	}
	high, pos, _ := a.enter(5, 0)
	if pos != 1 {
		t.Fatalf("high priority pos = %d, want 1 (ahead of low)", pos)
	}
	if _, _, err := a.enter(9, 0); protocol.AsError(err).Code != protocol.CodeBusy {
		t.Fatalf("full queue: err = %v, want BUSY", err)
	}
	_ = t0
	a.release()
	select {
	case <-high.ready:
	case <-time.After(time.Second):
		t.Fatal("high priority ticket not admitted first")
	}
	select {
	case <-low.ready:
		t.Fatal("low admitted while the slot is taken")
	default:
	}
	// A waiter that gives up leaves the queue.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.wait(ctx, low); err == nil {
		t.Fatal("cancelled wait returned nil")
	}
	if r, q := a.load(); r != 1 || q != 0 {
		t.Fatalf("load = %d running %d queued, want 1/0", r, q)
	}
}

func TestServeEmitsAcceptedChunksAndDone(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(0)), WithVersion("v-test"))
	var kinds []string
	done, err := w.Serve(context.Background(), req("one two three"), func(ev *pb.Event) error {
		switch ev.GetKind().(type) {
		case *pb.Event_Accepted:
			kinds = append(kinds, "accepted")
		case *pb.Event_Chunk:
			kinds = append(kinds, "chunk")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if kinds[0] != "accepted" || len(kinds) < 3 {
		t.Fatalf("events %v", kinds)
	}
	if done.GetWorkerVersion() != "v-test" || done.GetUsage().GetCompletionTokens() == 0 || done.GetTiming() == nil {
		t.Fatalf("done = %v", done)
	}
}

func TestServeErrors(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(10*time.Millisecond)))
	tests := []struct {
		name string
		mod  func(*pb.QueryRequest)
		ctx  func() (context.Context, context.CancelFunc)
		want pb.ErrorCode
	}{
		{"invalid", func(r *pb.QueryRequest) { r.Id = nil }, nil, protocol.CodeBadRequest},
		{"unknown model", func(r *pb.QueryRequest) { r.Model = "x" }, nil, protocol.CodeUnsupported},
		{"deadline passed", func(r *pb.QueryRequest) { r.DeadlineUnixMs = time.Now().Add(-time.Second).UnixMilli() }, nil, protocol.CodeTimeout},
		{"deadline during run", func(r *pb.QueryRequest) {
			r.Prompt = strings.Repeat("w ", 200)
			r.DeadlineUnixMs = time.Now().Add(100 * time.Millisecond).UnixMilli()
		}, nil, protocol.CodeTimeout},
		{"cancelled", func(r *pb.QueryRequest) { r.Prompt = strings.Repeat("w ", 200) }, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 50*time.Millisecond)
		}, protocol.CodeTimeout},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := req("hello")
			tc.mod(r)
			ctx, cancel := context.Background(), func() {}
			if tc.ctx != nil {
				ctx, cancel = tc.ctx()
			}
			defer cancel()
			_, err := w.Serve(ctx, r, func(*pb.Event) error { return nil })
			if pe := protocol.AsError(err); pe == nil || pe.Code != tc.want {
				t.Fatalf("err = %v, want %s", err, protocol.CodeName(tc.want))
			}
		})
	}
	if r, q, _, _ := w.Load(); r != 0 || q != 0 {
		t.Fatalf("slots leaked: running %d queued %d", r, q)
	}
}

func TestDrainRefusesWithBusy(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(0)))
	w.Drain()
	_, err := w.Serve(context.Background(), req("hi"), func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBusy || !pe.Retryable {
		t.Fatalf("err = %v, want retryable BUSY", err)
	}
}

// fakeMeter stands in for a GPU energy counter: each query costs 500 mJ.
type fakeMeter struct{}

func (fakeMeter) Begin() func() (uint64, bool) { return func() (uint64, bool) { return 500, true } }

func TestEnergyReportedInDoneAndAnnouncedPerToken(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(0)), WithEnergyMeter(fakeMeter{}))
	done, err := w.Serve(context.Background(), req("a b c d"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if done.GetEnergyMj() != 500 {
		t.Fatalf("energy = %d, want 500", done.GetEnergyMj())
	}
	caps := w.Capabilities()
	want := float32(0.5) / float32(done.GetUsage().GetCompletionTokens())
	if got := caps[0].JoulesPerToken; got < want*0.99 || got > want*1.01 {
		t.Fatalf("J/token = %v, want %v", got, want)
	}
	if caps[0].P50TTFTMs > 1000 || caps[0].Backend != "demo" {
		t.Fatalf("caps = %+v", caps[0])
	}
}

// bigChunk is a fake backend that emits one oversized text chunk.
type bigChunk struct{ *demo.Backend }

func (b bigChunk) Run(ctx context.Context, r *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	return backend.Usage{}, out.Chunk(strings.Repeat("é", protocol.MaxChunkText))
}

func TestOversizedChunksAreSplitOnRuneBoundaries(t *testing.T) {
	w := newWorker(t, bigChunk{demo.New("w")})
	var mu sync.Mutex
	var parts []string
	_, err := w.Serve(context.Background(), req("x"), func(ev *pb.Event) error {
		mu.Lock()
		defer mu.Unlock()
		if c := ev.GetChunk(); c != nil {
			if err := protocol.ValidateEvent(ev); err != nil {
				t.Error(err)
			}
			parts = append(parts, c.GetText())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(parts, "")
	if len(parts) < 2 || joined != strings.Repeat("é", protocol.MaxChunkText) {
		t.Fatalf("%d parts, joined correctly: %v", len(parts), joined == strings.Repeat("é", protocol.MaxChunkText))
	}
	for _, p := range parts {
		if !strings.HasPrefix(p, "é") {
			t.Fatal("a part starts mid-rune")
		}
	}
}

// panicky is a fake backend with a bug: it panics on every query.
type panicky struct{ *demo.Backend }

func (panicky) Run(context.Context, *pb.QueryRequest, backend.Sink) (backend.Usage, error) {
	var p *pb.Params
	_ = *p.Temperature // nil dereference, as a real backend bug would
	return backend.Usage{}, nil
}

func TestBackendPanicIsAnInternalError(t *testing.T) {
	w := newWorker(t, panicky{demo.New("w")})
	for i := 0; i < 2; i++ {
		_, err := w.Serve(context.Background(), req("x"), func(*pb.Event) error { return nil })
		if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeInternal {
			t.Fatalf("err = %v, want INTERNAL", err)
		}
	}
	if r, _, _, _ := w.Load(); r != 0 {
		t.Fatalf("a panicking query kept its slot: %d running", r)
	}
}

func TestAcceptedRepeatsAsHeartbeatWhileQueued(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(30*time.Millisecond)), WithMaxConcurrency(1), WithHeartbeat(20*time.Millisecond))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	busy := make(chan struct{})
	var once sync.Once
	go w.Serve(ctx, req(strings.Repeat("w ", 20)), func(ev *pb.Event) error {
		if ev.GetChunk() != nil {
			once.Do(func() { close(busy) })
		}
		return nil
	})
	<-busy
	var mu sync.Mutex
	var positions []uint32
	output := false
	_, err := w.Serve(context.Background(), req("queued"), func(ev *pb.Event) error {
		mu.Lock()
		defer mu.Unlock()
		if a := ev.GetAccepted(); a != nil {
			if !output {
				positions = append(positions, a.GetQueuePosition())
			}
		} else {
			output = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(positions) < 3 || positions[0] != 1 {
		t.Fatalf("Accepted positions %v: want the first at 1 and heartbeats after it", positions)
	}
	for i := 1; i < len(positions); i++ {
		if positions[i] > positions[i-1] {
			t.Fatalf("queue position went up: %v", positions)
		}
	}
}

// silent is a fake backend that produces nothing until cancelled, like a
// model server generating an image.
type silent struct{ *demo.Backend }

func (silent) Run(ctx context.Context, _ *pb.QueryRequest, _ backend.Sink) (backend.Usage, error) {
	<-ctx.Done()
	return backend.Usage{}, ctx.Err()
}

// A client that is gone is noticed by the next heartbeat write, and the
// backend call is cancelled then, not when it would next produce output.
func TestHeartbeatWriteFailureCancelsQuery(t *testing.T) {
	w := newWorker(t, silent{demo.New("w")}, WithHeartbeat(20*time.Millisecond))
	events := 0
	_, err := w.Serve(context.Background(), req("draw something"), func(*pb.Event) error {
		events++
		if events > 1 {
			return errors.New("stream reset by the client")
		}
		return nil
	})
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeCancelled {
		t.Fatalf("err = %v, want CANCELLED once the heartbeat found the client gone", err)
	}
}

// A client that goes away mid-answer cancels the query without costing
// the backend any health.
func TestClientGoneCostsNoHealth(t *testing.T) {
	w := newWorker(t, demo.New("w", demo.WithDelay(time.Millisecond)))
	for i := 0; i < 4; i++ {
		chunks := 0
		_, err := w.Serve(context.Background(), req(strings.Repeat("w ", 50)), func(ev *pb.Event) error {
			if ev.GetChunk() != nil {
				chunks++
				if chunks == 2 {
					return errors.New("stream reset by the client")
				}
			}
			return nil
		})
		if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeCancelled {
			t.Fatalf("err = %v, want CANCELLED", err)
		}
	}
	if h := w.Health(); h != 100 {
		t.Fatalf("health %d after clients left, want 100", h)
	}
	if st := w.Backends()[0]; st.Breaker != "closed" {
		t.Fatalf("breaker %s after clients left", st.Breaker)
	}
}

// TestRefusalsAnsweredDoNotTakeTheBackendOut: a model server that answers
// some queries with an error status (a prompt it fails on) is up; however
// many of those come in a row, the worker keeps serving the others. A
// server that cannot be reached still opens the breaker.
func TestRefusalsAnsweredDoNotTakeTheBackendOut(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/models":
			io.WriteString(w, `{"object":"list","data":[{"id":"m","object":"model"}]}`)
		case r.URL.Path == "/v1/chat/completions":
			body, _ := io.ReadAll(r.Body)
			if strings.Contains(string(body), "poison") {
				w.WriteHeader(http.StatusInternalServerError)
				io.WriteString(w, `{"error":{"message":"the model failed on this input"}}`)
				return
			}
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"fine\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n")
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	b, err := openai.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	w := newWorker(t, b)
	ask := func(prompt string) error {
		_, err := w.Serve(t.Context(), &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Prompt: prompt}, func(*pb.Event) error { return nil })
		return err
	}
	for i := range 6 {
		if err := ask("poison"); err == nil || protocol.AsError(err).Code != protocol.CodeBackendError || !strings.Contains(err.Error(), "failed on this input") {
			t.Fatalf("poisoned query %d: %v, want the server's own BACKEND_ERROR", i, err)
		}
	}
	if err := ask("hello"); err != nil {
		t.Fatalf("a query after six the server refused: %v", err)
	}

	srv.Close() // the server goes away: its failures count
	for range 3 {
		_ = ask("hello")
	}
	if err := ask("hello"); err == nil || !strings.Contains(err.Error(), "circuit open") {
		t.Fatalf("after three failures to reach the server: %v, want its breaker open", err)
	}
}
