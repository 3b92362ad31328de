package a1111

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

	mu         sync.Mutex
	bodies     []map[string]any
	interrupts int
}

func newFakeA1111(t *testing.T, answer func(http.ResponseWriter, *http.Request)) *fakeA1111 {
	f := &fakeA1111{t: t, answer: answer}
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
		f.answer(w, r)
	case r.Method == http.MethodPost && r.URL.Path == "/sdapi/v1/interrupt":
		f.mu.Lock()
		f.interrupts++
		f.mu.Unlock()
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

func imagineReq(model, prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: model, Prompt: prompt}
}

// newSink records what the backend emits; an A1111 server has no
// embeddings to give.
func newSink() *backendtest.Sink { return &backendtest.Sink{RefuseEmbeddings: true} }

func TestModels(t *testing.T) {
	f := newFakeA1111(t, images())
	b := backendtest.New(t, New, f.srv.URL)
	ms, err := b.Models(backendtest.Context(t))
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
	if err := b.Probe(backendtest.Context(t)); err != nil {
		t.Fatalf("probe: %v", err)
	}
	if b.Kind() != "a1111" || !strings.Contains(b.Name(), f.srv.URL) {
		t.Fatalf("kind %q name %q", b.Kind(), b.Name())
	}
}

func TestTxt2ImgExactRequestAndMedia(t *testing.T) {
	pic := backendtest.PNG(t)
	f := newFakeA1111(t, images(pic))
	b := backendtest.New(t, New, f.srv.URL+"/")
	seed := int64(42)
	req := imagineReq("sd_xl_base_1.0", "a red fox in snow")
	req.Params = &pb.Params{Size: "768x512", Seed: &seed}
	out := newSink()
	if _, err := b.Run(backendtest.Context(t), req, out); err != nil {
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
	if len(out.MediaData()) != 1 || out.Mimes()[0] != "image/png" || !bytes.Equal(out.MediaData()[0], pic) || len(out.Chunks()) != 0 {
		t.Fatalf("media %v (%d), chunks %q", out.Mimes(), len(out.MediaData()), out.Chunks())
	}

	// Defaults: 512x512, random seed, configured steps, prompt from messages.
	b = backendtest.New(t, New, f.srv.URL, WithSteps(7))
	req = &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "v1-5-pruned-emaonly",
		Messages: []*pb.Message{{Role: "user", Content: "a lighthouse"}}}
	if _, err := b.Run(backendtest.Context(t), req, newSink()); err != nil {
		t.Fatal(err)
	}
	got := f.Bodies()[1]
	if got["width"] != 512.0 || got["height"] != 512.0 || got["seed"] != -1.0 || got["steps"] != 7.0 || got["prompt"] != "a lighthouse" ||
		!reflect.DeepEqual(got["override_settings"], map[string]any{"sd_model_checkpoint": sd15Title}) {
		t.Fatalf("defaults: %v", got)
	}
}

func TestRefusedBeforeGenerating(t *testing.T) {
	f := newFakeA1111(t, images(backendtest.PNG(t)))
	b := backendtest.New(t, New, f.srv.URL)
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
			_, err := b.Run(backendtest.Context(t), tc.req, newSink())
			backendtest.WantCode(t, err, tc.code)
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
	raw := backendtest.Respond
	backendtest.RunErrorCases(t, []backendtest.ErrorCase{
		{Name: "422 validation", Answer: raw(422, `{"error":"RequestValidationError","detail":"","body":"","errors":"steps: value is not a valid integer"}`), Code: protocol.CodeBadRequest, Msg: "steps: value is not a valid integer"},
		{Name: "404 sampler", Answer: raw(404, `{"error":"HTTPException","detail":"Sampler not found","body":"","errors":""}`), Code: protocol.CodeBadRequest, Msg: "Sampler not found"},
		{Name: "500 out of memory", Answer: raw(500, `{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory. Tried to allocate 2.00 GiB"}`), Code: protocol.CodeBackendError, Msg: "CUDA out of memory"},
		{Name: "garbage", Answer: raw(200, `Internal Server Error`), Code: protocol.CodeBackendError, Msg: "malformed"},
		{Name: "truncated JSON", Answer: raw(200, `{"images": ["iVBO`), Code: protocol.CodeBackendError, Msg: "malformed"},
		{Name: "truncated body", Answer: truncated, Code: protocol.CodeBackendError, Msg: "mid-answer"},
		{Name: "no images", Answer: raw(200, `{"images": [], "parameters": {}, "info": ""}`), Code: protocol.CodeBackendError, Msg: "without an image"},
		{Name: "not base64", Answer: raw(200, `{"images": ["***"]}`), Code: protocol.CodeBackendError, Msg: "base64"},
		{Name: "not an image", Answer: raw(200, `{"images": ["`+base64.StdEncoding.EncodeToString([]byte("hello there"))+`"]}`), Code: protocol.CodeBackendError, Msg: "not an image"},
	}, func(t *testing.T, answer http.HandlerFunc) error {
		f := newFakeA1111(t, answer)
		_, err := backendtest.New(t, New, f.srv.URL).Run(backendtest.Context(t), imagineReq("v1-5-pruned-emaonly", "x"), newSink())
		if f.Interrupts() != 0 {
			t.Errorf("interrupted a finished generation")
		}
		return err
	})
}

func TestServerDown(t *testing.T) {
	b := backendtest.New(t, New, backendtest.DeadURL(t))
	backendtest.CheckServerDown(t, b, imagineReq("m", "x"))
	if _, err := b.Models(backendtest.Context(t)); err == nil {
		t.Fatal("Models succeeded against a dead server")
	}
}

func TestTimeoutInterruptsGeneration(t *testing.T) {
	f := newFakeA1111(t, backendtest.Hang(nil))
	b := backendtest.New(t, New, f.srv.URL, WithTimeout(300*time.Millisecond))
	_, err := b.Run(backendtest.Context(t), imagineReq("v1-5-pruned-emaonly", "x"), newSink())
	backendtest.WantCode(t, err, protocol.CodeTimeout)
	if n := f.Interrupts(); n != 1 {
		t.Fatalf("%d interrupts, want 1", n)
	}
}

func TestCancelInterruptsGeneration(t *testing.T) {
	for _, interrupt := range []bool{true, false} {
		var f *fakeA1111
		backendtest.CheckCancel(t, func(h http.HandlerFunc) backend.Backend {
			f = newFakeA1111(t, h)
			return backendtest.New(t, New, f.srv.URL, WithInterrupt(interrupt))
		}, imagineReq("v1-5-pruned-emaonly", "x"))
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
