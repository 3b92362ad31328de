// Package backendtest holds what the backends' tests share: a recording
// Sink, fake-server scaffolding (real HTTP servers on 127.0.0.1 answering
// as a backend's server would, or would break), table runners for the
// mapping of server answers to typed errors, and RunEngineSuite, the
// conformance suite every chat-and-embed backend passes against the real
// inference engine of package enginetest.
package backendtest

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var _ backend.RichSink = (*Sink)(nil)

// Sink records what a backend streams into it; it is safe for concurrent
// use. The zero value is ready.
type Sink struct {
	// OnChunk, when set, runs after each chunk with the number received
	// so far, outside the lock, so it may block or cancel the query.
	OnChunk func(n int)
	// RefuseEmbeddings makes Embedding fail, for a backend that must never
	// emit one.
	RefuseEmbeddings bool

	mu       sync.Mutex
	tools    []*pb.ToolCallDelta
	logprobs []*pb.TokenLogprob
	chunks   []string
	mimes    []string
	data     [][]byte
	embeds   map[int][]float32
}

// Chunk records text.
func (s *Sink) Chunk(text string) error {
	s.mu.Lock()
	s.chunks = append(s.chunks, text)
	n, f := len(s.chunks), s.OnChunk
	s.mu.Unlock()
	if f != nil {
		f(n)
	}
	return nil
}

// ToolCall records a tool-call delta.
func (s *Sink) ToolCall(d *pb.ToolCallDelta) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tools = append(s.tools, proto.CloneOf(d))
	return nil
}

// ChunkLogprobs records text and its logprobs.
func (s *Sink) ChunkLogprobs(text string, lps []*pb.TokenLogprob) error {
	s.mu.Lock()
	s.logprobs = append(s.logprobs, lps...)
	s.mu.Unlock()
	return s.Chunk(text)
}

// ToolCalls are the tool calls received, their deltas merged by index.
func (s *Sink) ToolCalls() []*pb.ToolCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*pb.ToolCall
	for _, d := range s.tools {
		for int(d.GetIndex()) >= len(out) {
			out = append(out, &pb.ToolCall{})
		}
		c := out[d.GetIndex()]
		if d.GetId() != "" {
			c.Id = d.GetId()
		}
		if d.GetName() != "" {
			c.Name = d.GetName()
		}
		c.Arguments += d.GetArguments()
	}
	return out
}

// Logprobs are the token logprobs received.
func (s *Sink) Logprobs() []*pb.TokenLogprob {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.logprobs)
}

// Media records one media result.
func (s *Sink) Media(mime string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mimes = append(s.mimes, mime)
	s.data = append(s.data, data)
	return nil
}

// Embedding records vector v as input i's.
func (s *Sink) Embedding(i int, v []float32) error {
	if s.RefuseEmbeddings {
		return errors.New("unexpected embedding")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.embeds == nil {
		s.embeds = map[int][]float32{}
	}
	s.embeds[i] = v
	return nil
}

// Chunks are the text chunks received, in order.
func (s *Sink) Chunks() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.chunks)
}

// Text is the chunks joined.
func (s *Sink) Text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.chunks, "")
}

// Mimes are the MIME types of the media received, in order.
func (s *Sink) Mimes() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.mimes)
}

// MediaData are the media received, in order.
func (s *Sink) MediaData() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.data)
}

// Embeddings are the vectors received, by input index.
func (s *Sink) Embeddings() map[int][]float32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.embeds)
}
