package rentahal

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
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
	// answer produces the handler's response for a valid request (whose
	// body the fake has read).
	answer http.HandlerFunc

	mu      sync.Mutex
	paths   []string
	bodies  []map[string]any
	headers []http.Header
	srv     *httptest.Server
}

func newFakeRentahalWorker(t *testing.T, route string, wrongRoute int, answer http.HandlerFunc) *fakeRentahalWorker {
	f := &fakeRentahalWorker{t: t, route: route, wrongRoute: wrongRoute, answer: answer}
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
	f.answer(w, r)
}

func (f *fakeRentahalWorker) record(r *http.Request, body map[string]any) {
	f.mu.Lock()
	f.paths = append(f.paths, r.URL.Path)
	if body != nil {
		f.bodies = append(f.bodies, body)
		f.headers = append(f.headers, r.Header.Clone())
	}
	f.mu.Unlock()
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

func respond(text string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"response": text})
	}
}

func chatReq(model, prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: model, Prompt: prompt}
}

// newSink records what the backend emits; a worker has no embeddings to
// give.
func newSink() *backendtest.Sink { return &backendtest.Sink{RefuseEmbeddings: true} }

func TestChatSendsExactRequest(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("Hello from llama3"))
	b := backendtest.New(t, New, w.srv.URL, WithModel("llama3"))
	out := newSink()
	if _, err := b.Run(backendtest.Context(t), chatReq("llama3", "Why is the sky blue?"), out); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"prompt": "Why is the sky blue?", "type": "chat", "model_type": "worker", "model_name": "llama3"}
	if got := w.Bodies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("worker received %v, want exactly %v", got, want)
	}
	if ct := w.headers[0].Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	if strings.Join(out.Chunks(), "") != "Hello from llama3" || len(out.MediaData()) != 0 {
		t.Fatalf("output chunks %q media %d", out.Chunks(), len(out.MediaData()))
	}
}

func TestConversationIsFlattened(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("ok"))
	b := backendtest.New(t, New, w.srv.URL, WithModel("m"))
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Messages: []*pb.Message{
		{Role: "system", Content: "Be brief."},
		{Role: "user", Content: "Hi"},
		{Role: "assistant", Content: "Hello."},
		{Role: "user", Content: "Name a colour."},
	}}
	if _, err := b.Run(backendtest.Context(t), req, newSink()); err != nil {
		t.Fatal(err)
	}
	want := "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Name a colour."
	if got := w.Bodies()[0]["prompt"]; got != want {
		t.Fatalf("prompt %q, want %q", got, want)
	}
}

func TestVisionSendsBase64Image(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("a red dot"))
	b := backendtest.New(t, New, w.srv.URL, WithModel("llava"), WithTypes(pb.QueryType_QUERY_TYPE_VISION))
	pic := backendtest.PNG(t)
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_VISION, Model: "llava", Messages: []*pb.Message{
		{Role: "user", Content: "What is this?", Attachments: []*pb.Attachment{{Mime: "image/png", Data: pic}}},
	}}
	out := newSink()
	if _, err := b.Run(backendtest.Context(t), req, out); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"prompt": "What is this?", "type": "vision", "model_type": "worker", "model_name": "llava",
		"image": base64.StdEncoding.EncodeToString(pic)}
	if got := w.Bodies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("worker received %v, want exactly %v", got, want)
	}
	if strings.Join(out.Chunks(), "") != "a red dot" {
		t.Fatalf("chunks %q", out.Chunks())
	}
}

func TestImagineEmitsMedia(t *testing.T) {
	pic := backendtest.PNG(t)
	for _, tc := range []struct {
		name, answer string
	}{
		{"plain base64", base64.StdEncoding.EncodeToString(pic)},
		{"data URL", "data:image/png;base64," + base64.StdEncoding.EncodeToString(pic)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(tc.answer))
			b := backendtest.New(t, New, w.srv.URL, WithModel("sd"), WithTypes(pb.QueryType_QUERY_TYPE_IMAGINE))
			out := newSink()
			req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd", Prompt: "a red dot"}
			if _, err := b.Run(backendtest.Context(t), req, out); err != nil {
				t.Fatal(err)
			}
			want := map[string]any{"prompt": "a red dot", "type": "imagine", "model_type": "worker", "model_name": "sd"}
			if got := w.Bodies(); !reflect.DeepEqual(got[0], want) {
				t.Fatalf("worker received %v, want %v", got[0], want)
			}
			if len(out.MediaData()) != 1 || out.Mimes()[0] != "image/png" || !bytes.Equal(out.MediaData()[0], pic) || len(out.Chunks()) != 0 {
				t.Fatalf("media %v (%d items), chunks %q", out.Mimes(), len(out.MediaData()), out.Chunks())
			}
		})
	}
}

func TestImagineRejectsNonImage(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(base64.StdEncoding.EncodeToString([]byte("just some text"))))
	b := backendtest.New(t, New, w.srv.URL, WithModel("sd"), WithTypes(pb.QueryType_QUERY_TYPE_IMAGINE))
	_, err := b.Run(backendtest.Context(t), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd", Prompt: "x"}, newSink())
	backendtest.WantCode(t, err, protocol.CodeBackendError)
}

func TestLongAnswerIsSplitIntoChunks(t *testing.T) {
	long := strings.Repeat("ü", protocol.MaxChunkText) // 2 bytes per rune: 2 chunks at least
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond(long))
	b := backendtest.New(t, New, w.srv.URL, WithModel("m"))
	out := newSink()
	if _, err := b.Run(backendtest.Context(t), chatReq("m", "talk"), out); err != nil {
		t.Fatal(err)
	}
	if len(out.Chunks()) < 2 {
		t.Fatalf("%d chunks, want several", len(out.Chunks()))
	}
	for _, c := range out.Chunks() {
		if len(c) > protocol.MaxChunkText || !utf8Valid(c) {
			t.Fatalf("chunk of %d bytes (valid UTF-8: %v)", len(c), utf8Valid(c))
		}
	}
	if strings.Join(out.Chunks(), "") != long {
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
			b := backendtest.New(t, New, w.srv.URL+"/", WithModel("m")) // trailing slash on the base URL is ignored
			for i := 0; i < 2; i++ {
				out := newSink()
				if _, err := b.Run(backendtest.Context(t), chatReq("m", "hi"), out); err != nil {
					t.Fatalf("query %d: %v", i, err)
				}
				if strings.Join(out.Chunks(), "") != "fine" {
					t.Fatalf("query %d: chunks %q", i, out.Chunks())
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
	b := backendtest.New(t, New, srv.URL, WithModel("m"))
	_, err := b.Run(backendtest.Context(t), chatReq("m", "hi"), newSink())
	pe := backendtest.WantCode(t, err, protocol.CodeBackendError)
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
	b := backendtest.New(t, New, srv.URL, WithModel("m"))
	_, err := b.Run(backendtest.Context(t), chatReq("m", "hi"), newSink())
	pe := backendtest.WantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "/predict") || !strings.Contains(pe.Message, "405") {
		t.Errorf("%+v", pe)
	}
}

func TestErrorMapping(t *testing.T) {
	truncated := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"response": "half an ans`) // then the connection closes
	}
	raw := backendtest.Respond
	backendtest.RunErrorCases(t, []backendtest.ErrorCase{
		{Name: "422 validation", Answer: raw(422, `{"detail":[{"loc":["body","prompt"],"msg":"field required"}]}`), Code: protocol.CodeBadRequest, Msg: "field required"},
		{Name: "400 plain text", Answer: raw(400, "prompt too long"), Code: protocol.CodeBadRequest, Msg: "prompt too long"},
		{Name: "429", Answer: raw(429, `{"detail":"slow down"}`), Code: protocol.CodeBusy, Msg: "slow down"},
		{Name: "500 with detail", Answer: raw(500, `{"detail":"Model prediction failed: exit status 1"}`), Code: protocol.CodeBackendError, Msg: "Model prediction failed"},
		{Name: "503 empty", Answer: raw(503, ``), Code: protocol.CodeBusy, Msg: "Service Unavailable"},
		{Name: "garbage", Answer: raw(200, `<html>oops</html>`), Code: protocol.CodeBackendError, Msg: "malformed"},
		{Name: "truncated JSON", Answer: raw(200, `{"response": "abc`), Code: protocol.CodeBackendError, Msg: "malformed"},
		{Name: "truncated body", Answer: truncated, Code: protocol.CodeBackendError, Msg: "mid-answer"},
		{Name: "no response field", Answer: raw(200, `{"text":"hi"}`), Code: protocol.CodeBackendError, Msg: "response"},
		{Name: "response not a string", Answer: raw(200, `{"response":{"text":"hi"}}`), Code: protocol.CodeBackendError, Msg: "malformed"},
	}, func(t *testing.T, answer http.HandlerFunc) error {
		w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, answer)
		_, err := backendtest.New(t, New, w.srv.URL, WithModel("m")).Run(backendtest.Context(t), chatReq("m", "hi"), newSink())
		return err
	})
}

func TestServerDown(t *testing.T) {
	b := backendtest.New(t, New, backendtest.DeadURL(t), WithModel("m"))
	backendtest.CheckServerDown(t, b, chatReq("m", "hi"))
}

func TestSlowWorkerTimesOut(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, backendtest.Hang(nil))
	b := backendtest.New(t, New, w.srv.URL, WithModel("m"), WithTimeout(200*time.Millisecond))
	_, err := b.Run(backendtest.Context(t), chatReq("m", "hi"), newSink())
	backendtest.WantCode(t, err, protocol.CodeTimeout)

	// The query's own deadline counts the same.
	backendtest.CheckDeadline(t, worker(t), chatReq("m", "hi"))
}

func TestCancelStopsTheCall(t *testing.T) {
	backendtest.CheckCancel(t, worker(t), chatReq("m", "hi"))
}

// worker builds a backend for model m in front of a worker answering with h.
func worker(t *testing.T) backendtest.Serving {
	return func(h http.HandlerFunc) backend.Backend {
		w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, h)
		return backendtest.New(t, New, w.srv.URL, WithModel("m"))
	}
}

func TestRefusedBeforeCalling(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict", http.StatusNotFound, respond("never"))
	b := backendtest.New(t, New, w.srv.URL, WithModel("m"), WithTypes(pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION))
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
			_, err := b.Run(backendtest.Context(t), tc.req, newSink())
			backendtest.WantCode(t, err, tc.code)
		})
	}
	if p := w.Paths(); len(p) != 0 {
		t.Fatalf("worker was called: %q", p)
	}
}

func TestProbe(t *testing.T) {
	w := newFakeRentahalWorker(t, "/predict/", http.StatusTemporaryRedirect, respond("x"))
	if err := backendtest.New(t, New, w.srv.URL).Probe(backendtest.Context(t)); err != nil {
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
		{"404: not a RENTAHAL worker", 404, `{"detail":"Not Found"}`, protocol.CodeUnsupported},
		{"200 with a web page: not a RENTAHAL worker", 200, "<!DOCTYPE html><html><head><title>My site</title></head></html>", protocol.CodeBackendError},
		{"200 with text: not a RENTAHAL worker", 200, "OK", protocol.CodeBackendError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.status)
				io.WriteString(w, tc.body)
			}))
			t.Cleanup(srv.Close)
			backendtest.WantCode(t, backendtest.New(t, New, srv.URL).Probe(backendtest.Context(t)), tc.code)
		})
	}
}

func TestModelsAndNew(t *testing.T) {
	b := backendtest.New(t, New, "http://127.0.0.1:8000/")
	ms, err := b.Models(backendtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Name != "rentahal" || !reflect.DeepEqual(ms[0].Types, []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}) {
		t.Fatalf("models %+v", ms)
	}
	if b.Kind() != "rentahal" || !strings.Contains(b.Name(), "http://127.0.0.1:8000") {
		t.Fatalf("kind %q name %q", b.Kind(), b.Name())
	}
	b = backendtest.New(t, New, "http://10.0.0.5:8001", WithModel("llava"), WithTypes(pb.QueryType_QUERY_TYPE_VISION, pb.QueryType_QUERY_TYPE_CHAT))
	ms, _ = b.Models(backendtest.Context(t))
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
