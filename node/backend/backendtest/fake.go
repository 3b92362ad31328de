package backendtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image"
	"image/color"
	"image/png"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Context is the context for one test's backend calls: at most a minute
// long, so a hung backend fails the test instead of stalling the run, and
// cancelled when the test ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// New builds a backend with newBackend(url, opts...), failing t if it
// cannot.
func New[B, O any](t testing.TB, newBackend func(string, ...O) (B, error), url string, opts ...O) B {
	t.Helper()
	b, err := newBackend(url, opts...)
	if err != nil {
		t.Fatalf("New(%q): %v", url, err)
	}
	return b
}

// Serve runs h on 127.0.0.1 until the test ends and returns its base URL.
func Serve(t testing.TB, h http.HandlerFunc) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL
}

// DeadURL is the base URL of a loopback port that nothing listens on.
func DeadURL(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// Respond answers every request with status and body, as JSON.
func Respond(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

// Hang reads the request and then answers nothing until the client hangs
// up (only once the body is read does the server notice the client
// leaving). arrived, when not nil, gets a value (if there is room) when
// the request is in.
func Hang(arrived chan<- struct{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if arrived != nil {
			select {
			case arrived <- struct{}{}:
			default:
			}
		}
		<-r.Context().Done()
	}
}

// StallAfter sends data, flushed, and then nothing until the client hangs
// up: a server that stalls mid-answer.
func StallAfter(data string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, data)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}
}

// CutAfter sends data, flushed, and then closes the connection: a server
// that dies mid-answer.
func CutAfter(data string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, data)
		w.(http.Flusher).Flush()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	}
}

// PNG is a small valid PNG image with one coloured pixel.
func PNG(t testing.TB) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 8, 8))
	img.Set(2, 3, color.RGBA{10, 200, 10, 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// ChatRequest is a chat query of one user message.
func ChatRequest(model, prompt string, maxTokens uint32) *pb.QueryRequest {
	return &pb.QueryRequest{
		Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: model,
		Messages: []*pb.Message{{Role: "user", Content: prompt}},
		Params:   &pb.Params{MaxTokens: maxTokens},
	}
}

// WantCode fails t unless err is a *protocol.Error with code, and returns
// it. A backend's errors must be typed: a plain error would reach the
// client as INTERNAL.
func WantCode(t testing.TB, err error, code pb.ErrorCode) *protocol.Error {
	t.Helper()
	var pe *protocol.Error
	if !errors.As(err, &pe) {
		t.Fatalf("error %v (%T), want a *protocol.Error %s", err, err, protocol.CodeName(code))
	}
	if pe.Code != code {
		t.Fatalf("code %s (%q), want %s", protocol.CodeName(pe.Code), pe.Message, protocol.CodeName(code))
	}
	return pe
}

// JSONRecorder is a fake server's record of the JSON body of the last
// request it got, for tests that check what a backend sends.
type JSONRecorder struct {
	mu   sync.Mutex
	body map[string]any
}

// Handler records each request's JSON body, then lets answer reply.
func (j *JSONRecorder) Handler(answer func(w http.ResponseWriter)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var m map[string]any
		if json.Unmarshal(b, &m) == nil { // a GET's empty body keeps the last
			j.mu.Lock()
			j.body = m
			j.mu.Unlock()
		}
		answer(w)
	}
}

// Body is the last request's body, nil before any.
func (j *JSONRecorder) Body() map[string]any {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.body
}

// SlowStart is a backend whose first token takes Wait: a model server
// loading the model, or a long prompt on a CPU. A worker heartbeats
// meanwhile.
type SlowStart struct {
	backend.Backend
	Wait time.Duration
}

// Run waits Wait (or ctx), then runs the query on the wrapped backend.
func (s SlowStart) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	select {
	case <-time.After(s.Wait):
	case <-ctx.Done():
		return backend.Usage{}, ctx.Err()
	}
	return s.Backend.Run(ctx, req, out)
}
