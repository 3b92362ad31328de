package backendtest

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// NewFunc builds the backend under test for the server at url.
type NewFunc func(url string) (backend.Backend, error)

// RunEngineSuite drives a backend against the real inference engine
// (llama.cpp through node-llama-cpp, package enginetest): probe and model
// list, streamed chat with usage, cancellation reaching the engine,
// concurrent queries, embeddings, and the engine's refusals as typed
// errors. newBackend gets the engine's URL; the backend must list the
// engine's model (enginetest.DefaultModel) for chat and embed.
func RunEngineSuite(t *testing.T, newBackend NewFunc) {
	e, b := startEngine(t, newBackend)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	t.Run("probe and models", func(t *testing.T) {
		if err := b.Probe(ctx); err != nil {
			t.Fatalf("Probe: %v", err)
		}
		ms, err := b.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ms) != 1 || ms[0].Name != e.Model() || ms[0].ContextLength != 2048 ||
			!ms[0].HasType(pb.QueryType_QUERY_TYPE_CHAT) || !ms[0].HasType(pb.QueryType_QUERY_TYPE_EMBED) ||
			ms[0].HasType(pb.QueryType_QUERY_TYPE_VISION) {
			t.Fatalf("Models = %+v, want %s with chat and embed, context 2048", ms, e.Model())
		}
	})

	t.Run("streaming chat", func(t *testing.T) {
		var s Sink
		u, err := b.Run(ctx, ChatRequest(e.Model(), "hello swarm", 24), &s)
		if err != nil {
			t.Fatal(err)
		}
		// The engine sends a line or event per token: the answer arrives
		// in pieces.
		if n := len(s.Chunks()); n < 8 || s.Text() == "" {
			t.Fatalf("got %d chunks %q, want the answer streamed in several", n, s.Text())
		}
		// Usage comes from the engine's last line or include_usage event.
		// max_tokens bounds it; the engine's chat template may stop a
		// little earlier when random text happens to hold a stop string.
		if u.CompletionTokens == 0 || u.CompletionTokens > 24 || u.PromptTokens == 0 {
			t.Fatalf("usage = %+v, want 1-24 completion tokens and some prompt tokens", u)
		}
	})

	t.Run("cancel stops generation", func(t *testing.T) {
		before, err := e.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		qctx, qcancel := context.WithCancel(ctx)
		defer qcancel()
		s := Sink{OnChunk: func(n int) {
			if n == 3 {
				qcancel()
			}
		}}
		_, err = b.Run(qctx, ChatRequest(e.Model(), "tell me everything", 1<<20), &s)
		WantCode(t, err, protocol.CodeCancelled)
		// The engine saw the disconnect and stopped generating.
		after, err := e.WaitStat(ctx, "aborted", before.Aborted+1)
		if err != nil {
			t.Fatalf("engine never aborted the generation: %v", err)
		}
		if after.Completed != before.Completed {
			t.Fatalf("stats %+v after %+v: the cancelled generation completed", after, before)
		}
	})

	t.Run("concurrent queries", func(t *testing.T) {
		before, err := e.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// Each query holds its first chunk until all four have one, so
		// they are provably in flight at once.
		const n = 4
		var first sync.WaitGroup
		first.Add(n)
		all := make(chan struct{})
		go func() { first.Wait(); close(all) }()
		var wg sync.WaitGroup
		errs := make([]error, n)
		usages := make([]backend.Usage, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s := &Sink{OnChunk: func(k int) {
					if k == 1 {
						first.Done()
						select {
						case <-all:
						case <-ctx.Done():
						}
					}
				}}
				usages[i], errs[i] = b.Run(ctx, ChatRequest(e.Model(), strings.Repeat("word ", i+1), 32), s)
			}()
		}
		wg.Wait()
		for i := range n {
			if errs[i] != nil || usages[i].CompletionTokens == 0 || usages[i].CompletionTokens > 32 {
				t.Errorf("query %d: usage %+v, err %v", i, usages[i], errs[i])
			}
		}
		after, err := e.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if after.Completed-before.Completed != n {
			t.Errorf("engine completed %d generations, want %d", after.Completed-before.Completed, n)
		}
	})

	t.Run("embed", func(t *testing.T) {
		var s Sink
		req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: e.Model(), Inputs: []string{"a peer", "a node"}}
		u, err := b.Run(ctx, req, &s)
		if err != nil {
			t.Fatal(err)
		}
		if es := s.Embeddings(); len(es) != 2 || len(es[0]) != 64 || len(es[1]) != 64 || u.PromptTokens == 0 {
			t.Fatalf("embeddings %d (dims %d, %d), usage %+v; want 2 of 64", len(es), len(es[0]), len(es[1]), u)
		}
	})

	t.Run("unknown model is unsupported", func(t *testing.T) {
		_, err := b.Run(ctx, ChatRequest("no-such-model", "hi", 4), &Sink{})
		pe := WantCode(t, err, protocol.CodeUnsupported)
		if !strings.Contains(pe.Message, "not found") {
			t.Errorf("message %q does not carry the engine's", pe.Message)
		}
	})

	t.Run("images to a text model are a bad request", func(t *testing.T) {
		req := ChatRequest(e.Model(), "what is this?", 4)
		req.Type = pb.QueryType_QUERY_TYPE_VISION
		req.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png", Data: []byte("\x89PNG")}}
		_, err := b.Run(ctx, req, &Sink{})
		pe := WantCode(t, err, protocol.CodeBadRequest)
		if !strings.Contains(pe.Message, "does not support image") {
			t.Errorf("message %q does not carry the engine's", pe.Message)
		}
	})
}

// RunEngineKilled kills the engine while it streams an answer: the query
// ends with a retryable BACKEND_ERROR at once, not after a timeout, and
// Probe and Models fail typed. newPatient must build the backend with
// timeouts far beyond the test's deadline (an hour), so that only noticing
// the dead connection can end the query in time.
func RunEngineKilled(t *testing.T, newPatient NewFunc) {
	e, b := startEngine(t, newPatient)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := Sink{OnChunk: func(n int) {
		if n == 3 {
			e.Kill()
		}
	}}
	_, err := b.Run(ctx, ChatRequest(e.Model(), "go on forever", 1<<20), &s)
	pe := WantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable {
		t.Errorf("%v is not retryable; another worker could answer", pe)
	}
	if n := len(s.Chunks()); n < 3 {
		t.Errorf("got %d chunks before the kill", n)
	}
	// A dead server refuses connections: the probe says so, typed.
	WantCode(t, b.Probe(ctx), protocol.CodeBackendError)
	_, err = b.Models(ctx)
	WantCode(t, err, protocol.CodeBackendError)
}

// startEngine starts an engine for the test and the backend under test in
// front of it.
func startEngine(t *testing.T, newBackend NewFunc) (*enginetest.Engine, backend.Backend) {
	t.Helper()
	e := enginetest.Start(t)
	b, err := newBackend(e.URL())
	if err != nil {
		t.Fatalf("backend for the engine: %v", err)
	}
	return e, b
}
