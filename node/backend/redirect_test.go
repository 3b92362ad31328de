package backend_test

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/ollama"
	"github.com/mtor-swarm/mtor/node/backend/openai"
)

// TestNoBackendFollowsARedirect: a model server's port answering a query
// with a redirect (whatever holds the port: another program, a hostile
// one) fails the query; the prompt and the API key never go to where it
// points, for the backends with a default client and with the caller's.
func TestNoBackendFollowsARedirect(t *testing.T) {
	var reached atomic.Int64
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached.Add(1) }))
	defer elsewhere.Close()
	port := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.URL+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer port.Close()
	for _, tc := range []struct {
		name string
		make func() (backend.Backend, error)
	}{
		{"openai", func() (backend.Backend, error) { return openai.New(port.URL, openai.WithAPIKey("sk-secret")) }},
		{"openai, own client", func() (backend.Backend, error) {
			return openai.New(port.URL, openai.WithAPIKey("sk-secret"), openai.WithHTTPClient(&http.Client{}))
		}},
		{"ollama", func() (backend.Backend, error) { return ollama.New(port.URL) }},
		{"ollama, own client", func() (backend.Backend, error) { return ollama.New(port.URL, ollama.WithHTTPClient(&http.Client{})) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.make()
			if err != nil {
				t.Fatal(err)
			}
			var s backendtest.Sink
			if _, err := b.Run(t.Context(), backendtest.ChatRequest("m", "a secret prompt", 4), &s); err == nil {
				t.Fatal("a redirected query answered")
			}
			if n := reached.Load(); n != 0 {
				t.Fatalf("the redirect's target got %d requests", n)
			}
		})
	}
}
