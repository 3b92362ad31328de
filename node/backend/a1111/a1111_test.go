package a1111

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

const (
	sd15Title = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
	sdxlTitle = "sd_xl_base_1.0.safetensors [31e35c80fc]"
)

// fakeA1111 is a protocol fake of AUTOMATIC1111's API (no Stable Diffusion
// can run here): /sdapi/v1/sd-models, /sdapi/v1/txt2img and
// /sdapi/v1/interrupt in their documented shapes. It records what it gets.
type fakeA1111 struct {
	t      *testing.T
	answer func(w http.ResponseWriter, r *http.Request)
	srv    *httptest.Server

	mu          sync.Mutex
	bodies      []map[string]any
	interrupts  int
	txtArrived  chan struct{}
	interrupted chan struct{}
}

func newFakeA1111(t *testing.T, answer func(http.ResponseWriter, *http.Request)) *fakeA1111 {
	f := &fakeA1111{t: t, answer: answer, txtArrived: make(chan struct{}, 16), interrupted: make(chan struct{}, 16)}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeA1111) serve(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/sdapi/v1/sd-models":
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `[
 {"title":"`+sd15Title+`","model_name":"v1-5-pruned-emaonly","hash":"6ce0161689","sha256":"6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa","filename":"/sd/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors","config":null},
 {"title":"`+sdxlTitle+`","model_name":"sd_xl_base_1.0","hash":"31e35c80fc","sha256":null,"filename":"/sd/models/Stable-diffusion/sd_xl_base_1.0.safetensors","config":null}
]`)
	case r.Method == http.MethodPost && r.URL.Path == "/sdapi/v1/txt2img":
		raw, _ := io.ReadAll(r.Body)
		var body map[string]any
		if err := json.Unmarshal(raw, &body); err != nil {
			f.t.Errorf("fake a1111: request is not JSON: %v", err)
		}
		f.mu.Lock()
		f.bodies = append(f.bodies, body)
		f.mu.Unlock()
		f.txtArrived <- struct{}{}
		f.answer(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/sdapi/v1/interrupt":
		f.mu.Lock()
		f.interrupts++
		f.mu.Unlock()
		f.interrupted <- struct{}{}
		io.WriteString(w, `{}`)
	default:
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"detail":"Not Found"}`)
	}
}

func (f *fakeA1111) Bodies() []map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...)
}

func (f *fakeA1111) Interrupts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.interrupts
}

func testPNG(t *testing.T) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 8, 8))
	img.Set(2, 3, color.RGBA{10, 200, 10, 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func images(imgs ...[]byte) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, _ *http.Request) {
		enc := make([]string, len(imgs))
		for i, b := range imgs {
			enc[i] = base64.StdEncoding.EncodeToString(b)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"images": enc, "parameters": map[string]any{}, "info": "{}"})
	}
}

func raw(status int, body string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

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

func imagineReq(model, prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: model, Prompt: prompt}
}

func mustNew(t *testing.T, url string, opts ...Option) *Backend {
	t.Helper()
	b, err := New(url, opts...)
	if err != nil {
		t.Fatalf("New(%q): %v", url, err)
	}
	return b
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

func TestModels(t *testing.T) {
	f := newFakeA1111(t, images())
	b := mustNew(t, f.srv.URL)
	ms, err := b.Models(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
		if !reflect.DeepEqual(m.Types, []pb.QueryType{pb.QueryType_QUERY_TYPE_IMAGINE}) {
			t.Errorf("%s types %v", m.Name, m.Types)
		}
	}
	if !reflect.DeepEqual(names, []string{"v1-5-pruned-emaonly", "sd_xl_base_1.0"}) {
		t.Fatalf("names %q", names)
	}
	if err := b.Probe(context.Background()); err != nil {
		t.Fatalf("probe: %v", err)
	}
	if b.Kind() != "a1111" || !strings.Contains(b.Name(), f.srv.URL) {
		t.Fatalf("kind %q name %q", b.Kind(), b.Name())
	}
}

func TestTxt2ImgExactRequestAndMedia(t *testing.T) {
	pic := testPNG(t)
	f := newFakeA1111(t, images(pic))
	b := mustNew(t, f.srv.URL+"/")
	seed := int64(42)
	req := imagineReq("sd_xl_base_1.0", "a red fox in snow")
	req.Params = &pb.Params{Size: "768x512", Seed: &seed}
	var out recSink
	if _, err := b.Run(context.Background(), req, &out); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"prompt": "a red fox in snow", "negative_prompt": "", "width": 768.0, "height": 512.0,
		"steps": 20.0, "seed": 42.0, "batch_size": 1.0, "n_iter": 1.0, "send_images": true, "save_images": false,
		"override_settings": map[string]any{"sd_model_checkpoint": sdxlTitle},
	}
	if got := f.Bodies(); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("server received %v\nwant exactly   %v", got, want)
	}
	if len(out.media) != 1 || out.mimes[0] != "image/png" || !bytes.Equal(out.media[0], pic) || len(out.chunks) != 0 {
		t.Fatalf("media %v (%d), chunks %q", out.mimes, len(out.media), out.chunks)
	}

	// Defaults: 512x512, random seed, configured steps, prompt from messages.
	b = mustNew(t, f.srv.URL, WithSteps(7))
	req = &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "v1-5-pruned-emaonly",
		Messages: []*pb.Message{{Role: "user", Content: "a lighthouse"}}}
	if _, err := b.Run(context.Background(), req, &recSink{}); err != nil {
		t.Fatal(err)
	}
	got := f.Bodies()[1]
	if got["width"] != 512.0 || got["height"] != 512.0 || got["seed"] != -1.0 || got["steps"] != 7.0 || got["prompt"] != "a lighthouse" ||
		!reflect.DeepEqual(got["override_settings"], map[string]any{"sd_model_checkpoint": sd15Title}) {
		t.Fatalf("defaults: %v", got)
	}
}

func TestRefusedBeforeGenerating(t *testing.T) {
	f := newFakeA1111(t, images(testPNG(t)))
	b := mustNew(t, f.srv.URL)
	for _, tc := range []struct {
		name string
		req  *pb.QueryRequest
		code pb.ErrorCode
	}{
		{"chat", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "sd_xl_base_1.0", Prompt: "hi"}, protocol.CodeUnsupported},
		{"unknown checkpoint", imagineReq("nope", "x"), protocol.CodeUnsupported},
		{"empty prompt", imagineReq("sd_xl_base_1.0", " "), protocol.CodeBadRequest},
		{"huge size", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd_xl_base_1.0", Prompt: "x", Params: &pb.Params{Size: "9999x512"}}, protocol.CodeBadRequest},
		{"bad size", &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd_xl_base_1.0", Prompt: "x", Params: &pb.Params{Size: "big"}}, protocol.CodeBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := b.Run(context.Background(), tc.req, &recSink{})
			wantCode(t, err, tc.code)
		})
	}
	if n := len(f.Bodies()); n != 0 {
		t.Fatalf("txt2img called %d times", n)
	}
}

func TestErrorMapping(t *testing.T) {
	truncated := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"images": ["iVBO`)
	}
	for _, tc := range []struct {
		name   string
		answer func(http.ResponseWriter, *http.Request)
		code   pb.ErrorCode
		msg    string
	}{
		{"422 validation", raw(422, `{"error":"RequestValidationError","detail":"","body":"","errors":"steps: value is not a valid integer"}`), protocol.CodeBadRequest, "steps: value is not a valid integer"},
		{"404 sampler", raw(404, `{"error":"HTTPException","detail":"Sampler not found","body":"","errors":""}`), protocol.CodeBadRequest, "Sampler not found"},
		{"500 out of memory", raw(500, `{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory. Tried to allocate 2.00 GiB"}`), protocol.CodeBackendError, "CUDA out of memory"},
		{"garbage", raw(200, `Internal Server Error`), protocol.CodeBackendError, "malformed"},
		{"truncated JSON", raw(200, `{"images": ["iVBO`), protocol.CodeBackendError, "malformed"},
		{"truncated body", truncated, protocol.CodeBackendError, "mid-answer"},
		{"no images", raw(200, `{"images": [], "parameters": {}, "info": ""}`), protocol.CodeBackendError, "without an image"},
		{"not base64", raw(200, `{"images": ["***"]}`), protocol.CodeBackendError, "base64"},
		{"not an image", raw(200, `{"images": ["`+base64.StdEncoding.EncodeToString([]byte("hello there"))+`"]}`), protocol.CodeBackendError, "not an image"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeA1111(t, tc.answer)
			b := mustNew(t, f.srv.URL)
			_, err := b.Run(context.Background(), imagineReq("v1-5-pruned-emaonly", "x"), &recSink{})
			pe := wantCode(t, err, tc.code)
			if !strings.Contains(pe.Message, tc.msg) {
				t.Errorf("message %q lacks %q", pe.Message, tc.msg)
			}
			if strings.Contains(pe.Message, "127.0.0.1") {
				t.Errorf("message %q leaks the server address", pe.Message)
			}
			if f.Interrupts() != 0 {
				t.Errorf("interrupted a finished generation")
			}
		})
	}
}

func TestServerDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + ln.Addr().String()
	ln.Close()
	b := mustNew(t, url)
	_, err = b.Run(context.Background(), imagineReq("m", "x"), &recSink{})
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "connection refused") {
		t.Fatalf("%+v", pe)
	}
	wantCode(t, b.Probe(context.Background()), protocol.CodeBackendError)
	if _, err := b.Models(context.Background()); err == nil {
		t.Fatal("Models succeeded against a dead server")
	}
}

func blockUntilGone(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }

func TestTimeoutInterruptsGeneration(t *testing.T) {
	f := newFakeA1111(t, blockUntilGone)
	b := mustNew(t, f.srv.URL, WithTimeout(300*time.Millisecond))
	_, err := b.Run(context.Background(), imagineReq("v1-5-pruned-emaonly", "x"), &recSink{})
	wantCode(t, err, protocol.CodeTimeout)
	if n := f.Interrupts(); n != 1 {
		t.Fatalf("%d interrupts, want 1", n)
	}
}

func TestCancelInterruptsGeneration(t *testing.T) {
	for _, interrupt := range []bool{true, false} {
		f := newFakeA1111(t, blockUntilGone)
		b := mustNew(t, f.srv.URL, WithInterrupt(interrupt))
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := b.Run(ctx, imagineReq("v1-5-pruned-emaonly", "x"), &recSink{})
			errc <- err
		}()
		select {
		case <-f.txtArrived:
		case <-time.After(30 * time.Second):
			t.Fatal("txt2img never arrived")
		}
		cancel()
		select {
		case err := <-errc:
			wantCode(t, err, protocol.CodeCancelled)
		case <-time.After(30 * time.Second):
			t.Fatal("Run did not return after cancel")
		}
		// Run posts the interrupt before it returns.
		want := 0
		if interrupt {
			want = 1
		}
		if n := f.Interrupts(); n != want {
			t.Fatalf("interrupt=%v: %d interrupts, want %d", interrupt, n, want)
		}
	}
}

func TestNewValidates(t *testing.T) {
	for _, tc := range []struct {
		url  string
		opts []Option
	}{
		{"127.0.0.1:7860", nil},
		{"ftp://h", nil},
		{"http://h/#x", nil},
		{"http://h", []Option{WithSteps(0)}},
		{"http://h", []Option{WithTimeout(-time.Second)}},
	} {
		if _, err := New(tc.url, tc.opts...); err == nil {
			t.Errorf("New(%q) succeeded", tc.url)
		}
	}
}
