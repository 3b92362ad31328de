package openai_test

import (
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// These tests drive the backend against the real inference engine
// (llama.cpp through node-llama-cpp, node/enginetest) speaking the
// OpenAI-compatible API.

func TestAgainstEngine(t *testing.T) {
	backendtest.RunEngineSuite(t, func(url string) (backend.Backend, error) {
		// The base URL may name /v1; the engine's model also embeds.
		return openai.New(url+"/v1/", openai.WithModelTypes(map[string][]pb.QueryType{
			enginetest.DefaultModel: {pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_EMBED},
		}))
	})
}

func TestEngineKilledMidAnswer(t *testing.T) {
	backendtest.RunEngineKilled(t, func(url string) (backend.Backend, error) {
		return openai.New(url, openai.WithIdleTimeout(time.Hour), openai.WithWorkTimeout(time.Hour))
	})
}

// TestEngineModelTypesGuessed lists the engine's model without declared
// types: chat by name, context length from llama.cpp's meta.
func TestEngineModelTypesGuessed(t *testing.T) {
	e := enginetest.Start(t, enginetest.WithModelName("nomic-embed-tiny"))
	b, err := openai.New(e.URL())
	if err != nil {
		t.Fatal(err)
	}
	ms, err := b.Models(backendtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Name != "nomic-embed-tiny" || ms[0].ContextLength != 2048 ||
		len(ms[0].Types) != 1 || ms[0].Types[0] != pb.QueryType_QUERY_TYPE_EMBED {
		t.Fatalf("Models = %+v, want nomic-embed-tiny as an embedding model with context 2048", ms)
	}
}
