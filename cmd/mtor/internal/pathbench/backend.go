// Package pathbench measures the cost of a path to an OpenAI-compatible
// server: an instant backend it serves itself, a load generator that reads
// streamed answers, the reverse proxies that serve as baselines (Go's
// httputil.ReverseProxy, nginx where installed) and the CPU time of the
// processes on the path. `mtor bench` puts the swarm's paths beside them.
package pathbench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// Models the backend serves: Model answers at once, SlowModel spaces its
// tokens SlowInterval apart (a real model's pace, for TTFT under many
// concurrent streams).
const (
	Model        = "bench"
	SlowModel    = "bench-slow"
	SlowInterval = 50 * time.Millisecond
	// Token is the text of every streamed token. The load generator
	// counts it to check each answer is whole, so it must not occur
	// anywhere else in a response.
	Token = "zq "
	// DefaultTokens make an answer unless the request's max_tokens asks
	// for another number, 1 to MaxTokens: the backend then streams
	// exactly that many, so that a bench can tell what a path costs per
	// answer from what it costs per token.
	DefaultTokens = 16
	MaxTokens     = 4096
	// maxRequest bounds a request body the backend reads.
	maxRequest = 1 << 20
)

// Backend is an instant OpenAI-compatible server on loopback: GET
// /v1/models and streamed POST /v1/chat/completions (DefaultTokens
// content chunks, or max_tokens of them, a finish chunk, a usage chunk
// and [DONE], each flushed as a model server does).
type Backend struct {
	srv *http.Server
	ln  net.Listener
}

var (
	tokenEvent  = []byte(`data: {"id":"chatcmpl-b","object":"chat.completion.chunk","created":0,"model":"bench","choices":[{"index":0,"delta":{"content":"` + Token + `"},"finish_reason":null}]}` + "\n\n")
	finishEvent = []byte(`data: {"id":"chatcmpl-b","object":"chat.completion.chunk","created":0,"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}` + "\n\n")
	doneEvent   = []byte("data: [DONE]\n\n")
	modelList   = []byte(`{"object":"list","data":[{"id":"` + Model + `","object":"model","owned_by":"bench"},{"id":"` + SlowModel + `","object":"model","owned_by":"bench"}]}`)
)

// StartBackend serves the backend on a loopback port until Close.
func StartBackend() (*Backend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("backend listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(modelList)
	})
	mux.HandleFunc("POST /v1/chat/completions", serveChat)
	b := &Backend{ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}}
	go func() { _ = b.srv.Serve(ln) }()
	return b, nil
}

// URL is the backend's base URL.
func (b *Backend) URL() string { return "http://" + b.ln.Addr().String() }

// Close stops the backend.
func (b *Backend) Close() error { return b.srv.Close() }

func serveChat(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequest))
	if err != nil {
		http.Error(w, `{"error":{"message":"request body too large"}}`, http.StatusRequestEntityTooLarge)
		return
	}
	var req struct {
		Model     string `json:"model"`
		MaxTokens int    `json:"max_tokens"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		http.Error(w, `{"error":{"message":"request body is not JSON"}}`, http.StatusBadRequest)
		return
	}
	tokens := DefaultTokens
	if req.MaxTokens > 0 {
		tokens = min(req.MaxTokens, MaxTokens)
	}
	var interval time.Duration
	if req.Model == SlowModel {
		interval = SlowInterval
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	send := func(b []byte) error {
		if _, err := w.Write(b); err != nil {
			return err
		}
		return rc.Flush()
	}
	for i := range tokens {
		if interval > 0 && i > 0 {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(interval):
			}
		}
		if send(tokenEvent) != nil {
			return
		}
	}
	for _, b := range [][]byte{finishEvent, usageEvent(tokens), doneEvent} {
		if send(b) != nil {
			return
		}
	}
}

// usageEvent is the chunk that reports an answer's tokens.
func usageEvent(tokens int) []byte {
	return []byte(`data: {"id":"chatcmpl-b","object":"chat.completion.chunk","created":0,"model":"bench","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":` +
		strconv.Itoa(tokens) + `,"total_tokens":` + strconv.Itoa(tokens+8) + `}}` + "\n\n")
}

// ErrIncomplete is wrapped by a query whose answer was not whole.
var ErrIncomplete = errors.New("incomplete answer")

// waitReady polls url until it answers 200 or ctx ends.
func waitReady(ctx context.Context, url string) error {
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if resp, err := http.DefaultClient.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w", url, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
