package detect

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
)

// generous keeps the tests robust on a loaded machine; Detect's own default
// is much shorter.
const generous = 20 * time.Second

// server starts a real HTTP server on 127.0.0.1 answering path with body.
func server(t *testing.T, path string, status int, body string, hdr ...string) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+path, func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i+1 < len(hdr); i += 2 {
			w.Header().Set(hdr[i], hdr[i+1])
		}
		w.WriteHeader(status)
		io.WriteString(w, body)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL
}

const (
	ollamaTagList = `{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","size":1321098329,"digest":"baf6a787fdff","details":{"family":"llama"}},{"name":"nomic-embed-text:latest","model":"nomic-embed-text:latest"}]}`
	openaiList    = `{"object":"list","data":[{"id":"qwen2.5-0.5b-instruct-q4_k_m.gguf","object":"model","created":1730000000,"owned_by":"llamacpp"}]}`
)

func TestFindsRealServers(t *testing.T) {
	ollama := server(t, "/api/tags", 200, ollamaTagList)
	openai := server(t, "/v1/models", 200, openaiList)
	got := Detect(context.Background(), WithTimeout(generous), WithCandidates(
		Candidate{KindOllama, ollama, "Ollama"},
		Candidate{KindOpenAI, backendtest.DeadURL(t), "nothing"},
		Candidate{KindOpenAI, openai + "/", "llama.cpp"},
	))
	want := []Found{
		{Kind: KindOllama, URL: ollama, Note: "Ollama", Models: []string{"llama3.2:1b", "nomic-embed-text:latest"}},
		{Kind: KindOpenAI, URL: openai, Note: "llama.cpp", Models: []string{"qwen2.5-0.5b-instruct-q4_k_m.gguf"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("found %+v\nwant  %+v", got, want)
	}
}

func TestNothingListening(t *testing.T) {
	got := Detect(context.Background(), WithTimeout(generous), WithCandidates(
		Candidate{KindOllama, backendtest.DeadURL(t), ""},
		Candidate{KindOpenAI, backendtest.DeadURL(t), ""},
	))
	if len(got) != 0 {
		t.Fatalf("found %+v", got)
	}
}

func TestSomethingElseIsNotFound(t *testing.T) {
	for _, tc := range []struct {
		name string
		kind string
		url  string
	}{
		{"404 on /v1/models", KindOpenAI, server(t, "/other", 200, `{}`)},
		{"HTML page", KindOpenAI, server(t, "/v1/models", 200, `<!doctype html><title>router</title>`)},
		{"JSON of another shape", KindOpenAI, server(t, "/v1/models", 200, `{"status":"ok"}`)},
		{"OpenAI list where Ollama is expected", KindOllama, server(t, "/api/tags", 200, openaiList)},
		{"401", KindOpenAI, server(t, "/v1/models", 401, `{"error":{"message":"no key"}}`)},
		{"redirect", KindOpenAI, server(t, "/v1/models", 307, ``, "Location", "http://127.0.0.1:1/")},
		{"mtor bridge by owner", KindOpenAI, server(t, "/v1/models", 200, `{"object":"list","data":[{"id":"demo","object":"model","owned_by":"mtor swarm","mtor":{"types":["chat"],"peers":2}}]}`)},
		{"mtor bridge by header", KindOpenAI, server(t, "/v1/models", 200, `{"object":"list","data":[]}`, "X-Mtor-Peer", "12D3KooW")},
		{"not loopback", KindOpenAI, "http://192.0.2.1:8080"},
		{"unknown kind", "vllm", server(t, "/v1/models", 200, openaiList)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Detect(context.Background(), WithTimeout(generous), WithCandidates(Candidate{tc.kind, tc.url, ""}))
			if len(got) != 0 {
				t.Fatalf("found %+v", got)
			}
		})
	}
}

func TestHangingServerDoesNotHoldUpDetection(t *testing.T) {
	var hung atomic.Int32
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hung.Add(1)
		<-r.Context().Done()
	}))
	t.Cleanup(slow.Close)
	openai := server(t, "/v1/models", 200, openaiList)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got := Detect(ctx, WithTimeout(2*time.Second), WithCandidates(
		Candidate{KindOllama, slow.URL, ""},
		Candidate{KindOpenAI, openai, ""},
	))
	if len(got) != 1 || got[0].URL != openai {
		t.Fatalf("found %+v", got)
	}
	if hung.Load() != 1 {
		t.Fatalf("the slow server saw %d requests", hung.Load())
	}
	if ctx.Err() != nil {
		t.Fatal("Detect ran past the outer deadline")
	}
}

func TestDuplicatesProbedOnce(t *testing.T) {
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, openaiList)
	}))
	t.Cleanup(srv.Close)
	got := Detect(context.Background(), WithTimeout(generous), WithCandidates(
		Candidate{KindOpenAI, srv.URL, ""}, Candidate{KindOpenAI, srv.URL + "/", ""}))
	if len(got) != 1 || hits.Load() != 1 {
		t.Fatalf("found %d, %d requests", len(got), hits.Load())
	}
}

func TestDefaultCandidatesAreLoopback(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range DefaultCandidates() {
		if c.Kind != KindOllama && c.Kind != KindOpenAI {
			t.Errorf("%s: kind %q", c.URL, c.Kind)
		}
		host, _, err := net.SplitHostPort(c.URL[len("http://"):])
		if err != nil || !net.ParseIP(host).IsLoopback() {
			t.Errorf("%s is not a loopback URL", c.URL)
		}
		if seen[c.URL] {
			t.Errorf("%s listed twice", c.URL)
		}
		seen[c.URL] = true
	}
	if !seen["http://127.0.0.1:11434"] {
		t.Error("Ollama's port missing")
	}
}

func TestLoopbackOnlyDialer(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:80": true, "127.1.2.3:80": true, "[::1]:80": true,
		"192.0.2.1:80": false, "[2001:db8::1]:80": false, "0.0.0.0:80": false, "localhost:80": false,
	} {
		if err := loopbackOnly("tcp", addr, nil); (err == nil) != ok {
			t.Errorf("%s: err %v, want allowed=%v", addr, err, ok)
		}
	}
}
