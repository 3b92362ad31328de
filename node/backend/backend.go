// Package backend defines how a worker talks to a model server. Each
// implementation lives in its own subpackage (demo, ollama, openai, ...).
package backend

import (
	"context"

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

// Usage is the token accounting of one query, as far as the backend knows.
type Usage struct {
	PromptTokens     uint32
	CompletionTokens uint32
}

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

// HasType reports whether m serves query type t.
func (m Model) HasType(t pb.QueryType) bool {
	for _, x := range m.Types {
		if x == t {
			return true
		}
	}
	return false
}
