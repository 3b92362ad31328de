package rentahal

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"image"
	"image/color"
	"image/png"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// fakeRentahalWorker is a protocol fake of a seed RENTAHAL worker (main.py):
// it serves the documented /predict and /health shapes exactly and records
// every request it receives. No real RENTAHAL worker (Python, Ollama, a GPU)
// can run here.
type fakeRentahalWorker struct {
	t *testing.T
	// route is the path the worker serves predict on; "/predict/" behaves as
	// FastAPI does (307 from /predict), see mode.
	route string
	// wrongRoute is the status for the other spelling: 307 (FastAPI), 404 or 405.
	wrongRoute int
	// answer produces the handler's response for a valid request.
	answer func(w http.ResponseWriter, r *http.Request, body map[string]any)

	mu       sync.Mutex
	paths    []string
	bodies   []map[string]any
	headers  []http.Header
	srv      *httptest.Server
	received chan struct{}
}

func newFakeRentahalWorker(t *testing.T, route string, wrongRoute int, answer func(http.ResponseWriter, *http.Request, map[string]any)) *fakeRentahalWorker {
	f := &fakeRentahalWorker{t: t, route: route, wrongRoute: wrongRoute, answer: answer, received: make(chan struct{}, 16)}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeRentahalWorker) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/health" && r.Method == http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"healthy"}`)
		return
	case r.URL.Path == f.route && r.Method == http.MethodPost:
	case r.URL.Path == "/predict" || r.URL.Path == "/predict/":
		f.record(r, nil)
		if f.wrongRoute == http.StatusTemporaryRedirect {
			http.Redirect(w, r, f.route, http.StatusTemporaryRedirect)
			return
		}
		http.Error(w, `{"detail":"Not Found"}`, f.wrongRoute)
		return
	default:
		http.Error(w, `{"detail":"Not Found"}`, http.StatusNotFound)
		return
	}
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		f.t.Errorf("fake worker: read body: %v", err)
		return
	}
	var body map[string]any
	if err := json.Unmarshal(raw, &body); err != nil {
		f.t.Errorf("fake worker: request is not JSON: %v: %q", err, raw)
		http.Error(w, `{"detail":"bad json"}`, http.StatusUnprocessableEntity)
		return
	}
	f.record(r, body)
	f.answer(w, r, body)
}

func (f *fakeRentahalWorker) record(r *http.Request, body map[string]any) {
	f.mu.Lock()
	f.paths = append(f.paths, r.URL.Path)
	if body != nil {
		f.bodies = append(f.bodies, body)
		f.headers = append(f.headers, r.Header.Clone())
	}
	f.mu.Unlock()
	select {
	case f.received <- struct{}{}:
	default:
	}
}

func (f *fakeRentahalWorker) Paths() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.paths...)
}

func (f *fakeRentahalWorker) Bodies() []map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...)
}

func respond(text string) func(http.ResponseWriter, *http.Request, map[string]any) {
	return func(w http.ResponseWriter, _ *http.Request, _ map[string]any) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"response": text})
	}
}

func raw(status int, body string) func(http.ResponseWriter, *http.Request, map[string]any) {
	return func(w http.ResponseWriter, _ *http.Request, _ map[string]any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

// recSink records what a backend emits.
type recSink struct {
	chunks []string
	mimes  []string
	media  [][]byte
}

func (s *recSink) Chunk(text string) error { s.chunks = append(s.chunks, text); return nil }
func (s *recSink) Media(mime string, data []byte) error {
	s.mimes = append(s.mimes, mime)
	s.media = append(s.media, data)
	return nil
}
func (s *recSink) Embedding(int, []float32) error { return errors.New("unexpected embedding") }

func chatReq(model, prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: model, Prompt: prompt}
}

func testPNG(t *testing.T) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 4, 4))
	img.Set(1, 1, color.RGBA{200, 10, 10, 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func mustNew(t *testing.T, url string, opts ...Option) *Backend {
	t.Helper()
	b, err := New(url, opts...)
	if err != nil {
		t.Fatalf("New(%q): %v", url, err)
	}
	return b
}

func TestChatSendsExactRequest(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("Hello from llama3"))
	b := mustNew(t, w.srv.URL, WithModel("llama3"))
	var out recSink
	if _, err := b.Run(context.Background(), chatReq("llama3", "Why is the sky blue?"), &out); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"prompt": "Why is the sky blue?", "type": "chat", "model_type": "worker", "model_name": "llama3"}
	if got := w.Bodies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("worker received %v, want exactly %v", got, want)
	}
	if ct := w.headers[0].Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	if strings.Join(out.chunks, "") != "Hello from llama3" || len(out.media) != 0 {
		t.Fatalf("output chunks %q media %d", out.chunks, len(out.media))
	}
}

func TestConversationIsFlattened(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("ok"))
	b := mustNew(t, w.srv.URL, WithModel("m"))
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Messages: []*pb.Message{
		{Role: "system", Content: "Be brief."},
		{Role: "user", Content: "Hi"},
		{Role: "assistant", Content: "Hello."},
		{Role: "user", Content: "Name a colour."},
	}}
	if _, err := b.Run(context.Background(), req, &recSink{}); err != nil {
		t.Fatal(err)
	}
	want := "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Name a colour."
	if got := w.Bodies()[0]["prompt"]; got != want {
		t.Fatalf("prompt %q, want %q", got, want)
	}
}

func TestVisionSendsBase64Image(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("a red dot"))
	b := mustNew(t, w.srv.URL, WithModel("llava"), WithTypes(pb.QueryType_QUERY_TYPE_VISION))
	pic := testPNG(t)
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_VISION, Model: "llava", Messages: []*pb.Message{
		{Role: "user", Content: "What is this?", Attachments: []*pb.Attachment{{Mime: "image/png", Data: pic}}},
	}}
	var out recSink
	if _, err := b.Run(context.Background(), req, &out); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"prompt": "What is this?", "type": "vision", "model_type": "worker", "model_name": "llava",
		"image": base64.StdEncoding.EncodeToString(pic)}
	if got := w.Bodies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("worker received %v, want exactly %v", got, want)
	}
	if strings.Join(out.chunks, "") != "a red dot" {
		t.Fatalf("chunks %q", out.chunks)
	}
}

func TestImagineEmitsMedia(t *testing.T) {
	pic := testPNG(t)
	for _, tc := range []struct {
		name, answer string
	}{
		{"plain base64", base64.StdEncoding.EncodeToString(pic)},
		{"data URL", "data:image/png;base64," + base64.StdEncoding.EncodeToString(pic)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(tc.answer))
			b := mustNew(t, w.srv.URL, WithModel("sd"), WithTypes(pb.QueryType_QUERY_TYPE_IMAGINE))
			var out recSink
			req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd", Prompt: "a red dot"}
			if _, err := b.Run(context.Background(), req, &out); err != nil {
				t.Fatal(err)
			}
			want := map[string]any{"prompt": "a red dot", "type": "imagine", "model_type": "worker", "model_name": "sd"}
			if got := w.Bodies(); !reflect.DeepEqual(got[0], want) {
				t.Fatalf("worker received %v, want %v", got[0], want)
			}
			if len(out.media) != 1 || out.mimes[0] != "image/png" || !bytes.Equal(out.media[0], pic) || len(out.chunks) != 0 {
				t.Fatalf("media %v (%d items), chunks %q", out.mimes, len(out.media), out.chunks)
			}
		})
	}
}

func TestImagineRejectsNonImage(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(base64.StdEncoding.EncodeToString([]byte("just some text"))))
	b := mustNew(t, w.srv.URL, WithModel("sd"), WithTypes(pb.QueryType_QUERY_TYPE_IMAGINE))
	_, err := b.Run(context.Background(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd", Prompt: "x"}, &recSink{})
	wantCode(t, err, protocol.CodeBackendError)
}

func TestLongAnswerIsSplitIntoChunks(t *testing.T) {
	long := strings.Repeat("ü", protocol.MaxChunkText) // 2 bytes per rune: 2 chunks at least
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(long))
	b := mustNew(t, w.srv.URL, WithModel("m"))
	var out recSink
	if _, err := b.Run(context.Background(), chatReq("m", "talk"), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.chunks) < 2 {
		t.Fatalf("%d chunks, want several", len(out.chunks))
	}
	for _, c := range out.chunks {
		if len(c) > protocol.MaxChunkText || !utf8Valid(c) {
			t.Fatalf("chunk of %d bytes (valid UTF-8: %v)", len(c), utf8Valid(c))
		}
	}
	if strings.Join(out.chunks, "") != long {
		t.Fatal("chunks do not add up to the answer")
	}
}

func utf8Valid(s string) bool { return strings.ToValidUTF8(s, "") == s }

func TestPredictRouteSpellings(t *testing.T) {
	for _, tc := range []struct {
		name       string
		route      string
		wrongRoute int
		wantPaths  []string // over two queries
	}{
		{"slash route, FastAPI redirect", "/predict/", http.StatusTemporaryRedirect, []string{"/predict", "/predict/", "/predict/"}},
		{"slash route, 404", "/predict/", http.StatusNotFound, []string{"/predict", "/predict/", "/predict/"}},
		{"slash route, 405", "/predict/", http.StatusMethodNotAllowed, []string{"/predict", "/predict/", "/predict/"}},
		{"plain route", "/predict", http.StatusNotFound, []string{"/predict", "/predict"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeRentahalWorker(t, tc.route, tc.wrongRoute, respond("fine"))
			b := mustNew(t, w.srv.URL+"/", WithModel("m")) // trailing slash on the base URL is ignored
			for i := 0; i < 2; i++ {
				var out recSink
				if _, err := b.Run(context.Background(), chatReq("m", "hi"), &out); err != nil {
					t.Fatalf("query %d: %v", i, err)
				}
				if strings.Join(out.chunks, "") != "fine" {
					t.Fatalf("query %d: chunks %q", i, out.chunks)
				}
			}
			if got := w.Paths(); !reflect.DeepEqual(got, tc.wantPaths) {
				t.Fatalf("paths %q, want %q", got, tc.wantPaths)
			}
			if n := len(w.Bodies()); n != 2 {
				t.Fatalf("worker answered %d queries, want 2", n)
			}
		})
	}
}

func TestNoPredictRoute(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	b := mustNew(t, srv.URL, WithModel("m"))
	_, err := b.Run(context.Background(), chatReq("m", "hi"), &recSink{})
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !strings.Contains(pe.Message, "/predict") {
		t.Errorf("message %q", pe.Message)
	}
}

// TestNoPredictRouteForPost: a server refusing POST on both spellings (405)
// is a misconfigured worker too, retryable on another.
func TestNoPredictRouteForPost(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, `{"detail":"Method Not Allowed"}`, http.StatusMethodNotAllowed)
	}))
	t.Cleanup(srv.Close)
	b := mustNew(t, srv.URL, WithModel("m"))
	_, err := b.Run(context.Background(), chatReq("m", "hi"), &recSink{})
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "/predict") || !strings.Contains(pe.Message, "405") {
		t.Errorf("%+v", pe)
	}
}

func wantCode(t *testing.T, err error, code pb.ErrorCode) *protocol.Error {
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

func deadAddress(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

func TestErrorMapping(t *testing.T) {
	truncated := func(w http.ResponseWriter, _ *http.Request, _ map[string]any) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"response": "half an ans`) // then the connection closes
	}
	for _, tc := range []struct {
		name      string
		answer    func(http.ResponseWriter, *http.Request, map[string]any)
		code      pb.ErrorCode
		retryable bool
		msg       string // substring of the message
	}{
		{"422 validation", raw(422, `{"detail":[{"loc":["body","prompt"],"msg":"field required"}]}`), protocol.CodeBadRequest, false, "field required"},
		{"400 plain text", raw(400, "prompt too long"), protocol.CodeBadRequest, false, "prompt too long"},
		{"429", raw(429, `{"detail":"slow down"}`), protocol.CodeBusy, true, "slow down"},
		{"500 with detail", raw(500, `{"detail":"Model prediction failed: exit status 1"}`), protocol.CodeBackendError, true, "Model prediction failed"},
		{"503 empty", raw(503, ``), protocol.CodeBackendError, true, "Service Unavailable"},
		{"garbage", raw(200, `<html>oops</html>`), protocol.CodeBackendError, true, "malformed"},
		{"truncated JSON", raw(200, `{"response": "abc`), protocol.CodeBackendError, true, "malformed"},
		{"truncated body", truncated, protocol.CodeBackendError, true, "mid-answer"},
		{"no response field", raw(200, `{"text":"hi"}`), protocol.CodeBackendError, true, "response"},
		{"response not a string", raw(200, `{"response":{"text":"hi"}}`), protocol.CodeBackendError, true, "malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, tc.answer)
			b := mustNew(t, w.srv.URL, WithModel("m"))
			_, err := b.Run(context.Background(), chatReq("m", "hi"), &recSink{})
			pe := wantCode(t, err, tc.code)
			if pe.Retryable != tc.retryable {
				t.Errorf("retryable %v, want %v", pe.Retryable, tc.retryable)
			}
			if !strings.Contains(pe.Message, tc.msg) {
				t.Errorf("message %q lacks %q", pe.Message, tc.msg)
			}
			if strings.Contains(pe.Message, "127.0.0.1") {
				t.Errorf("message %q leaks the worker address", pe.Message)
			}
		})
	}
}

func TestServerDown(t *testing.T) {
	url := deadAddress(t)
	b := mustNew(t, url, WithModel("m"))
	_, err := b.Run(context.Background(), chatReq("m", "hi"), &recSink{})
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "connection refused") {
		t.Fatalf("%+v", pe)
	}
	if strings.Contains(pe.Message, "127.0.0.1") {
		t.Errorf("message %q leaks the worker address", pe.Message)
	}
	wantCode(t, b.Probe(context.Background()), protocol.CodeBackendError)
}

// blockUntilGone answers nothing until the client hangs up.
func blockUntilGone(w http.ResponseWriter, r *http.Request, _ map[string]any) {
	<-r.Context().Done()
}

func TestSlowWorkerTimesOut(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, blockUntilGone)
	b := mustNew(t, w.srv.URL, WithModel("m"), WithTimeout(200*time.Millisecond))
	_, err := b.Run(context.Background(), chatReq("m", "hi"), &recSink{})
	wantCode(t, err, protocol.CodeTimeout)

	// The query's own deadline counts the same.
	b = mustNew(t, w.srv.URL, WithModel("m"))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err = b.Run(ctx, chatReq("m", "hi"), &recSink{})
	wantCode(t, err, protocol.CodeTimeout)
}

func TestCancelStopsTheCall(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, blockUntilGone)
	b := mustNew(t, w.srv.URL, WithModel("m"))
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := b.Run(ctx, chatReq("m", "hi"), &recSink{})
		errc <- err
	}()
	select {
	case <-w.received:
	case <-time.After(30 * time.Second):
		t.Fatal("worker never received the query")
	}
	cancel()
	select {
	case err := <-errc:
		wantCode(t, err, protocol.CodeCancelled)
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestRefusedBeforeCalling(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("never"))
	b := mustNew(t, w.srv.URL, WithModel("m"), WithTypes(pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION))
	for _, tc := range []struct {
		name string
		req  *pb.QueryRequest
		code pb.ErrorCode
	}{
		{"other model", chatReq("other", "hi"), protocol.CodeUnsupported},
		{"type not configured", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "m", Prompt: "x"}, protocol.CodeUnsupported},
		{"embed", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_EMBED, Model: "m", Inputs: []string{"x"}}, protocol.CodeUnsupported},
		{"vision without image", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_VISION, Model: "m", Prompt: "what?"}, protocol.CodeBadRequest},
		{"empty prompt", chatReq("m", "  "), protocol.CodeBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.Run(context.Background(), tc.req, &recSink{})
			wantCode(t, err, tc.code)
		})
	}
	if p := w.Paths(); len(p) != 0 {
		t.Fatalf("worker was called: %q", p)
	}
}

func TestProbe(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict/", http.StatusTemporaryRedirect, respond("x"))
	if err := mustNew(t, w.srv.URL).Probe(context.Background()); err != nil {
		t.Fatalf("healthy worker: %v", err)
	}
	for _, tc := range []struct {
		name   string
		status int
		body   string
		code   pb.ErrorCode
	}{
		{"unhealthy status", 200, `{"status":"degraded"}`, protocol.CodeBackendError},
		{"500", 500, `{"detail":"boom"}`, protocol.CodeBackendError},
		{"404", 404, `{"detail":"Not Found"}`, protocol.CodeBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.status)
				io.WriteString(w, tc.body)
			}))
			t.Cleanup(srv.Close)
			wantCode(t, mustNew(t, srv.URL).Probe(context.Background()), tc.code)
		})
	}
}

func TestModelsAndNew(t *testing.T) {
	b := mustNew(t, "http://127.0.0.1:8000/")
	ms, err := b.Models(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Name != "rentahal@127.0.0.1:8000" || !reflect.DeepEqual(ms[0].Types, []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}) {
		t.Fatalf("models %+v", ms)
	}
	if b.Kind() != "rentahal" || !strings.Contains(b.Name(), "http://127.0.0.1:8000") {
		t.Fatalf("kind %q name %q", b.Kind(), b.Name())
	}
	b = mustNew(t, "http://10.0.0.5:8001", WithModel("llava"), WithTypes(pb.QueryType_QUERY_TYPE_VISION, pb.QueryType_QUERY_TYPE_CHAT))
	ms, _ = b.Models(context.Background())
	if ms[0].Name != "llava" || !ms[0].HasType(pb.QueryType_QUERY_TYPE_VISION) || ms[0].HasType(pb.QueryType_QUERY_TYPE_IMAGINE) {
		t.Fatalf("models %+v", ms)
	}
	for _, tc := range []struct {
		url  string
		opts []Option
	}{
		{"127.0.0.1:8000", nil},
		{"ftp://host", nil},
		{"http://", nil},
		{"http://h/?q=1", nil},
		{"http://h", []Option{WithTypes(pb.QueryType_QUERY_TYPE_EMBED)}},
		{"http://h", []Option{WithTypes()}},
		{"http://h", []Option{WithModel("")}},
		{"http://h", []Option{WithTimeout(0)}},
	} {
		if _, err := New(tc.url, tc.opts...); err == nil {
			t.Errorf("New(%q, %d opts) succeeded", tc.url, len(tc.opts))
		}
	}
}
