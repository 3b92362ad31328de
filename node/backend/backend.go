// Package backend defines how a worker talks to a model server. Each
// implementation lives in its own subpackage (demo, ollama, openai, ...).
package backend

import (
	"context"
	"errors"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Model is one model a backend serves.
type Model struct {
	Name          string
	Types         []pb.QueryType
	ContextLength uint32 // 0 = unknown
	// Features are optional abilities announced with the model, such as
	// protocol.FeatureContinue: Run honours QueryRequest.continuation.
	Features []string
}

// Sink receives a query's output as the backend produces it. Its methods
// return an error when the client is gone; the backend should stop then.
type Sink interface {
	Chunk(text string) error
	Media(mime string, data []byte) error
	Embedding(index int, vector []float32) error
}

// RichSink is a Sink that also carries tool calls and log probabilities;
// the worker's sink is one. Backends reach it through SendToolCall and
// SendLogprobs, which work with any Sink.
type RichSink interface {
	Sink
	ToolCall(d *pb.ToolCallDelta) error
	// ChunkLogprobs is Chunk with the log probabilities of text's tokens.
	ChunkLogprobs(text string, lps []*pb.TokenLogprob) error
}

// ErrNoToolSink is returned by SendToolCall for a sink that cannot carry
// tool calls: the caller offered tools it cannot receive calls of.
var ErrNoToolSink = errors.New("backend: this sink cannot carry tool calls")

// SendToolCall passes a tool-call delta to out.
func SendToolCall(out Sink, d *pb.ToolCallDelta) error {
	rs, ok := out.(RichSink)
	if !ok {
		return ErrNoToolSink
	}
	return rs.ToolCall(d)
}

// SendLogprobs passes text with its tokens' log probabilities to out; a
// sink that cannot carry them gets the text alone.
func SendLogprobs(out Sink, text string, lps []*pb.TokenLogprob) error {
	if rs, ok := out.(RichSink); ok && len(lps) > 0 {
		return rs.ChunkLogprobs(text, lps)
	}
	return out.Chunk(text)
}

// Usage is the token accounting of one query, as far as the backend
// knows, and why the answer ended.
type Usage struct {
	PromptTokens     uint32
	CompletionTokens uint32
	// FinishReason is the backend's: protocol.FinishStop, FinishLength,
	// FinishToolCalls, FinishContentFilter, or "" when it did not say.
	FinishReason string
}

// AnsweredError is a model server's failure on one query in an answer it
// sent (HTTP 500): the server is up, and the query itself (its content,
// its size) may be the cause, as when one prompt makes it fail. The worker does not count it against the server's health, so
// that one client's queries cannot take a backend out for everyone; the
// routers judge the pattern (their breaker for the worker's model, which
// routes around it while another worker serves the model).
type AnsweredError struct{ Err error }

func (e *AnsweredError) Error() string { return e.Err.Error() }
func (e *AnsweredError) Unwrap() error { return e.Err }

// Answered marks err, the typed error of an answer's status, as an
// AnsweredError.
func Answered(err error) error { return &AnsweredError{Err: err} }

// Backend is a model server the worker can call.
//
// Run must honour ctx: when it is cancelled the backend call stops at once
// and Run returns. Errors should be *protocol.Error with the right code
// (BAD_REQUEST for a request the backend refuses, TIMEOUT, BACKEND_ERROR
// for a server that is down or answers garbage); any other error is
// reported as BACKEND_ERROR.
type Backend interface {
	// Kind is the backend type: demo, ollama, openai, rentahal, a1111.
	Kind() string
	// Name identifies this instance for people, e.g. "ollama http://127.0.0.1:11434".
	Name() string
	// Models lists what the server serves now.
	Models(ctx context.Context) ([]Model, error)
	// Probe checks that the server is up; nil means healthy.
	Probe(ctx context.Context) error
	// Run answers one query, streaming output into out.
	Run(ctx context.Context, req *pb.QueryRequest, out Sink) (Usage, error)
}

// HasFeature reports whether m announces feature f.
func (m Model) HasFeature(f string) bool {
	for _, x := range m.Features {
		if x == f {
			return true
		}
	}
	return false
}

// HasFeatures reports whether m announces every feature of fs.
func (m Model) HasFeatures(fs []string) bool {
	for _, f := range fs {
		if !m.HasFeature(f) {
			return false
		}
	}
	return true
}

// HasType reports whether m serves query type t.
func (m Model) HasType(t pb.QueryType) bool {
	for _, x := range m.Types {
		if x == t {
			return true
		}
	}
	return false
}
