package openai_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// These tests drive the backend against the real inference engine
// (llama.cpp through node-llama-cpp, node/enginetest) speaking the OpenAI-compatible API.

// sink records what a backend streams; onChunk, when set, runs after each
// chunk with the number received so far.
type sink struct {
	mu      sync.Mutex
	chunks  []string
	embeds  map[int][]float32
	media   []string
	data    [][]byte
	onChunk func(n int)
}

func (s *sink) Chunk(text string) error {
	s.mu.Lock()
	s.chunks = append(s.chunks, text)
	n, f := len(s.chunks), s.onChunk
	s.mu.Unlock()
	if f != nil {
		f(n)
	}
	return nil
}

func (s *sink) Media(mime string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.media = append(s.media, mime)
	s.data = append(s.data, data)
	return nil
}

func (s *sink) Embedding(i int, v []float32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.embeds == nil {
		s.embeds = map[int][]float32{}
	}
	s.embeds[i] = v
	return nil
}

func (s *sink) text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.chunks, "")
}

func chatReq(model, prompt string, maxTokens uint32) *pb.QueryRequest {
	return &pb.QueryRequest{
		Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: model,
		Messages: []*pb.Message{{Role: "user", Content: prompt}},
		Params:   &pb.Params{MaxTokens: maxTokens},
	}
}

func wantCode(t *testing.T, err error, code pb.ErrorCode) *protocol.Error {
	t.Helper()
	pe := protocol.AsError(err)
	if pe == nil || pe.Code != code {
		t.Fatalf("err = %v, want %s", err, protocol.CodeName(code))
	}
	return pe
}

func TestAgainstEngine(t *testing.T) {
	e := enginetest.Start(t)
	// The base URL may name /v1; the engine's model also embeds.
	b, err := openai.New(e.URL()+"/v1/", openai.WithModelTypes(map[string][]pb.QueryType{
		e.Model(): {pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_EMBED},
	}))
	if err != nil {
		t.Fatal(err)
	}
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
		var s sink
		u, err := b.Run(ctx, chatReq(e.Model(), "hello swarm", 24), &s)
		if err != nil {
			t.Fatal(err)
		}
		// The engine sends an event per token: the answer arrives in pieces.
		if len(s.chunks) < 8 || s.text() == "" {
			t.Fatalf("got %d chunks %q, want the answer streamed in several", len(s.chunks), s.text())
		}
		// Usage comes from the engine's include_usage event.
		if u.CompletionTokens != 24 || u.PromptTokens == 0 {
			t.Fatalf("usage = %+v, want 24 completion tokens and some prompt tokens", u)
		}
	})

	t.Run("cancel stops generation", func(t *testing.T) {
		before, err := e.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		qctx, qcancel := context.WithCancel(ctx)
		defer qcancel()
		s := sink{onChunk: func(n int) {
			if n == 3 {
				qcancel()
			}
		}}
		_, err = b.Run(qctx, chatReq(e.Model(), "tell me everything", 1<<20), &s)
		wantCode(t, err, protocol.CodeCancelled)
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
				s := &sink{onChunk: func(k int) {
					if k == 1 {
						first.Done()
						select {
						case <-all:
						case <-ctx.Done():
						}
					}
				}}
				usages[i], errs[i] = b.Run(ctx, chatReq(e.Model(), strings.Repeat("word ", i+1), 32), s)
			}()
		}
		wg.Wait()
		for i := range n {
			if errs[i] != nil || usages[i].CompletionTokens != 32 {
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
		var s sink
		req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: e.Model(), Inputs: []string{"a peer", "a node"}}
		u, err := b.Run(ctx, req, &s)
		if err != nil {
			t.Fatal(err)
		}
		if len(s.embeds) != 2 || len(s.embeds[0]) != 64 || len(s.embeds[1]) != 64 || u.PromptTokens == 0 {
			t.Fatalf("embeddings %d (dims %d, %d), usage %+v; want 2 of 64", len(s.embeds), len(s.embeds[0]), len(s.embeds[1]), u)
		}
	})

	t.Run("unknown model is unsupported", func(t *testing.T) {
		_, err := b.Run(ctx, chatReq("no-such-model", "hi", 4), &sink{})
		pe := wantCode(t, err, protocol.CodeUnsupported)
		if !strings.Contains(pe.Message, "not found") {
			t.Errorf("message %q does not carry the engine's", pe.Message)
		}
	})

	t.Run("images to a text model are a bad request", func(t *testing.T) {
		req := chatReq(e.Model(), "what is this?", 4)
		req.Type = pb.QueryType_QUERY_TYPE_VISION
		req.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png", Data: []byte("\x89PNG")}}
		_, err := b.Run(ctx, req, &sink{})
		pe := wantCode(t, err, protocol.CodeBadRequest)
		if !strings.Contains(pe.Message, "does not support image") {
			t.Errorf("message %q does not carry the engine's", pe.Message)
		}
	})
}

// TestEngineKilledMidAnswer kills the engine while it streams: the query
// ends with a retryable BACKEND_ERROR at once, not after a timeout.
func TestEngineKilledMidAnswer(t *testing.T) {
	e := enginetest.Start(t)
	// Timeouts far beyond the test's deadline: only noticing the dead
	// connection can end the query in time.
	b, err := openai.New(e.URL(), openai.WithIdleTimeout(time.Hour), openai.WithWorkTimeout(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := sink{onChunk: func(n int) {
		if n == 3 {
			e.Kill()
		}
	}}
	_, err = b.Run(ctx, chatReq(e.Model(), "go on forever", 1<<20), &s)
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable {
		t.Errorf("%v is not retryable; another worker could answer", pe)
	}
	if len(s.chunks) < 3 {
		t.Errorf("got %d chunks before the kill", len(s.chunks))
	}
	// A dead server refuses connections: the probe says so, typed.
	wantCode(t, b.Probe(ctx), protocol.CodeBackendError)
	_, err = b.Models(ctx)
	wantCode(t, err, protocol.CodeBackendError)
}

// TestEngineModelTypesGuessed lists the engine's model without declared
// types: chat by name, context length from llama.cpp's meta.
func TestEngineModelTypesGuessed(t *testing.T) {
	e := enginetest.Start(t, enginetest.WithModelName("nomic-embed-tiny"))
	b, err := openai.New(e.URL())
	if err != nil {
		t.Fatal(err)
	}
	ms, err := b.Models(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Name != "nomic-embed-tiny" || ms[0].ContextLength != 2048 ||
		len(ms[0].Types) != 1 || ms[0].Types[0] != pb.QueryType_QUERY_TYPE_EMBED {
		t.Fatalf("Models = %+v, want nomic-embed-tiny as an embedding model with context 2048", ms)
	}
}
