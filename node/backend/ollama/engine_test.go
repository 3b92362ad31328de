package ollama_test

import (
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/ollama"
)

// These tests drive the backend against the real inference engine
// (llama.cpp through node-llama-cpp, node/enginetest) speaking Ollama's API.

func TestAgainstEngine(t *testing.T) {
	backendtest.RunEngineSuite(t, func(url string) (backend.Backend, error) { return ollama.New(url) })
}

func TestEngineKilledMidAnswer(t *testing.T) {
	backendtest.RunEngineKilled(t, func(url string) (backend.Backend, error) {
		return ollama.New(url, ollama.WithIdleTimeout(time.Hour), ollama.WithWorkTimeout(time.Hour))
	})
}
