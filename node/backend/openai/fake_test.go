package openai_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// The servers here are protocol fakes of OpenAI-compatible servers: each
// answers one request shape, well-formed or broken on purpose, or serves
// an endpoint (images, audio) the test engine does not have.

func fakeOpenAI(t *testing.T, h http.HandlerFunc, opts ...openai.Option) *openai.Backend {
	t.Helper()
	opts = append([]openai.Option{openai.WithIdleTimeout(500 * time.Millisecond)}, opts...)
	return backendtest.New(t, openai.New, backendtest.Serve(t, h), opts...)
}

func event(content string, finish string) string {
	f := "null"
	if finish != "" {
		f = `"` + finish + `"`
	}
	return fmt.Sprintf("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":%q},\"finish_reason\":%s}]}\n\n", content, f)
}

func TestFakeErrorMapping(t *testing.T) {
	respond := backendtest.Respond
	backendtest.RunErrorCases(t, []backendtest.ErrorCase{
		{Name: "openai bad request", Answer: respond(400, `{"error":{"message":"max_tokens is too large: 99999999","type":"invalid_request_error"}}`), Code: protocol.CodeBadRequest, Msg: "max_tokens is too large"},
		{Name: "vllm bad request", Answer: respond(400, `{"object":"error","message":"This model's maximum context length is 2048 tokens","type":"BadRequestError","code":400}`), Code: protocol.CodeBadRequest, Msg: "maximum context length"},
		{Name: "unprocessable", Answer: respond(422, `{"detail":"field required"}`), Code: protocol.CodeBadRequest, Msg: "field required"},
		{Name: "model not found", Answer: respond(404, `{"error":{"message":"The model 'x' does not exist","code":"model_not_found"}}`), Code: protocol.CodeUnsupported, Msg: "does not exist"},
		{Name: "bad key", Answer: respond(401, `{"error":{"message":"Incorrect API key provided"}}`), Code: protocol.CodeBackendError, Msg: "Incorrect API key"},
		{Name: "rate limited", Answer: respond(429, `{"error":{"message":"Rate limit reached"}}`), Code: protocol.CodeBusy, Msg: "Rate limit"},
		{Name: "loading", Answer: respond(503, `{"error":{"message":"Loading model","code":503}}`), Code: protocol.CodeBusy, Msg: "Loading model"},
		{Name: "gateway timeout", Answer: respond(504, ``), Code: protocol.CodeTimeout, Msg: "Gateway Timeout"},
		{Name: "server error", Answer: respond(500, `{"error":{"message":"CUDA out of memory"}}`), Code: protocol.CodeBackendError, Msg: "CUDA out of memory"},
	}, func(t *testing.T, answer http.HandlerFunc) error {
		_, err := fakeOpenAI(t, answer).Run(backendtest.Context(t), backendtest.ChatRequest("m", "hi", 4), &backendtest.Sink{})
		return err
	})
}

func TestFakeStreams(t *testing.T) {
	for _, c := range []struct {
		name string
		send func(w http.ResponseWriter, r *http.Request)
		err  string // "" = the answer is complete
		text string
	}{
		{"complete", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, ": keep-alive\n\n"+event("he", "")+event("llo", "")+event("", "stop")+"data: [DONE]\n\n")
		}, "", "hello"},
		{"crlf and multi-line data", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "event: message\r\ndata: {\"choices\":[{\"delta\":\r\ndata: {\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\r\n\r\ndata: [DONE]\r\n\r\n")
		}, "", "hi"},
		{"finished without [DONE]", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, event("ok", "")+event("", "length"))
		}, "", "ok"},
		{"ends mid-answer", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, event("a", "")+event("b", ""))
		}, "ended before the answer", "ab"},
		{"garbage", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, event("a", "")+"data: {not json\n\n")
		}, "malformed", "a"},
		{"error event", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, event("a", "")+`data: {"error":{"message":"the model crashed"}}`+"\n\n")
		}, "the model crashed", "a"},
		{"endless event", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "data: "+strings.Repeat("x", 2<<20))
		}, "longer than the limit", ""},
		{"stalls", backendtest.StallAfter(event("a", "")), "sent nothing", "a"},
		{"connection cut", backendtest.CutAfter(event("a", "")), "closed the connection", "a"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/event-stream")
				c.send(w, r)
			})
			var s backendtest.Sink
			_, err := b.Run(backendtest.Context(t), backendtest.ChatRequest("m", "hi", 4), &s)
			if s.Text() != c.text {
				t.Errorf("text %q, want %q", s.Text(), c.text)
			}
			if c.err == "" {
				if err != nil {
					t.Fatalf("complete stream: %v", err)
				}
				return
			}
			pe := backendtest.WantCode(t, err, protocol.CodeBackendError)
			if !strings.Contains(pe.Message, c.err) {
				t.Errorf("message %q does not contain %q", pe.Message, c.err)
			}
		})
	}
}

func TestFakeConnectionRefused(t *testing.T) {
	b := backendtest.New(t, openai.New, backendtest.DeadURL(t)+"/v1")
	backendtest.CheckServerDown(t, b, backendtest.ChatRequest("m", "hi", 4))
}

func TestFakeDeadlineAndCancel(t *testing.T) {
	// Timeouts far beyond the test's: only the query's deadline or
	// cancellation can end it.
	patient := func(h http.HandlerFunc) backend.Backend {
		return fakeOpenAI(t, h, openai.WithIdleTimeout(time.Hour), openai.WithWorkTimeout(time.Hour))
	}
	backendtest.CheckDeadline(t, patient, backendtest.ChatRequest("m", "hi", 4))
	backendtest.CheckCancel(t, patient, backendtest.ChatRequest("m", "hi", 4))
}

// TestFakeChatRequestShape checks what the backend sends for a vision
// query: the key, streaming with usage, images as data: URL parts.
func TestFakeChatRequestShape(t *testing.T) {
	var got map[string]any
	var auth, path string
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		auth, path = r.Header.Get("Authorization"), r.URL.Path
		json.NewDecoder(r.Body).Decode(&got)
		io.WriteString(w, event("a cat", "stop")+`data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":2}}`+"\n\ndata: [DONE]\n\n")
	}, openai.WithAPIKey("sk-test"))
	seed := int64(7)
	req := &pb.QueryRequest{
		Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_VISION, Model: "llava",
		Messages:    []*pb.Message{{Role: "system", Content: "be brief"}, {Role: "user", Content: "what is it?"}},
		Attachments: []*pb.Attachment{{Mime: "image/jpeg", Data: []byte("JPEG")}},
		Params:      &pb.Params{MaxTokens: 9, Seed: &seed, Stop: []string{"."}},
	}
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), req, &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Text() != "a cat" || u.PromptTokens != 30 || u.CompletionTokens != 2 {
		t.Fatalf("text %q usage %+v", s.Text(), u)
	}
	if auth != "Bearer sk-test" || path != "/v1/chat/completions" {
		t.Errorf("auth %q path %q", auth, path)
	}
	want := `{"max_tokens":9,"messages":[{"content":"be brief","role":"system"},{"content":[{"text":"what is it?","type":"text"},` +
		`{"image_url":{"url":"data:image/jpeg;base64,SlBFRw=="},"type":"image_url"}],"role":"user"}],` +
		`"model":"llava","seed":7,"stop":["."],"stream":true,"stream_options":{"include_usage":true}}`
	if js, _ := json.Marshal(got); string(js) != want {
		t.Fatalf("request\n%s\nwant\n%s", js, want)
	}
}

// TestFakeStreamOptionsRefused: a server that refuses stream_options is
// asked again without it, and usage is then counted from the deltas.
func TestFakeStreamOptionsRefused(t *testing.T) {
	var calls atomic.Int32
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		if bytes.Contains(body, []byte("stream_options")) {
			w.WriteHeader(400)
			io.WriteString(w, `{"error":{"message":"Unrecognized request argument supplied: stream_options"}}`)
			return
		}
		io.WriteString(w, event("a", "")+event("b", "")+event("c", "stop")+"data: [DONE]\n\n")
	})
	u, err := b.Run(backendtest.Context(t), backendtest.ChatRequest("m", "hi", 4), &backendtest.Sink{})
	if err != nil || u.CompletionTokens != 3 || calls.Load() != 2 {
		t.Fatalf("usage %+v err %v after %d calls; want 3 tokens after 2 calls", u, err, calls.Load())
	}
}

func TestFakeModels(t *testing.T) {
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"object":"list","data":[
			{"id":"meta-llama/Llama-3-8B","max_model_len":8192},
			{"id":"qwen2-vl-7b"},
			{"id":"text-embedding-3-small"},
			{"id":"BAAI/bge-m3"},
			{"id":"whisper-1"},
			{"id":"tts-1-hd"},
			{"id":"dall-e-3"},
			{"id":"lmstudio-model","type":"vlm","context_length":4096},
			{"id":"custom","type":"llm"},
			{"id":"bad\u0001name"}]}`)
	}, openai.WithModelTypes(map[string][]pb.QueryType{
		"custom":   {pb.QueryType_QUERY_TYPE_IMAGINE},
		"unlisted": {pb.QueryType_QUERY_TYPE_TTS},
	}))
	ms, err := b.Models(backendtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range ms {
		var types []string
		for _, ty := range m.Types {
			types = append(types, protocol.TypeName(ty))
		}
		got = append(got, fmt.Sprintf("%s %s %d", m.Name, strings.Join(types, ","), m.ContextLength))
	}
	want := []string{
		"meta-llama/Llama-3-8B chat 8192", "qwen2-vl-7b chat,vision 0", "text-embedding-3-small embed 0",
		"BAAI/bge-m3 embed 0", "whisper-1 stt 0", "tts-1-hd tts 0", "dall-e-3 imagine 0",
		"lmstudio-model chat,vision 4096", "custom imagine 0", "unlisted tts 0",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("Models:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestFakeNoModelList: a server without /v1/models still serves the
// declared models and probes healthy.
func TestFakeNoModelList(t *testing.T) {
	b := fakeOpenAI(t, http.NotFound, openai.WithModelTypes(map[string][]pb.QueryType{"sd": {pb.QueryType_QUERY_TYPE_IMAGINE}}))
	if err := b.Probe(backendtest.Context(t)); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	ms, err := b.Models(backendtest.Context(t))
	if err != nil || len(ms) != 1 || ms[0].Name != "sd" {
		t.Fatalf("Models = %+v, %v", ms, err)
	}
	plain := fakeOpenAI(t, http.NotFound)
	backendtest.WantCode(t, plain.Probe(backendtest.Context(t)), protocol.CodeUnsupported)
}

func TestFakeImagine(t *testing.T) {
	img := backendtest.PNG(t)
	var got map[string]any
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/images/generations" {
			w.WriteHeader(404)
			return
		}
		json.NewDecoder(r.Body).Decode(&got)
		fmt.Fprintf(w, `{"created":1,"data":[{"b64_json":%q}]}`, base64.StdEncoding.EncodeToString(img))
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sd", Prompt: "a cat", Params: &pb.Params{Size: "256x256"}}
	var s backendtest.Sink
	if _, err := b.Run(backendtest.Context(t), req, &s); err != nil {
		t.Fatal(err)
	}
	if len(s.Mimes()) != 1 || s.Mimes()[0] != "image/png" || !bytes.Equal(s.MediaData()[0], img) {
		t.Fatalf("media %v, want the PNG", s.Mimes())
	}
	if js, _ := json.Marshal(got); string(js) != `{"model":"sd","n":1,"prompt":"a cat","response_format":"b64_json","size":"256x256"}` {
		t.Errorf("request %s", js)
	}

	urlOnly := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"data":[{"url":"http://example.invalid/x.png"}]}`)
	})
	_, err := urlOnly.Run(backendtest.Context(t), req, &backendtest.Sink{})
	backendtest.WantCode(t, err, protocol.CodeBackendError)
}

func TestFakeTranscribe(t *testing.T) {
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseMultipartForm(1 << 20); err != nil {
			w.WriteHeader(400)
			return
		}
		f, h, err := r.FormFile("file")
		if err != nil {
			w.WriteHeader(400)
			return
		}
		data, _ := io.ReadAll(f)
		fmt.Fprintf(w, `{"text":"%s %s %s %d bytes"}`, r.FormValue("model"), h.Filename, h.Header.Get("Content-Type"), len(data))
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_STT, Model: "whisper-1",
		Attachments: []*pb.Attachment{{Mime: "audio/webm;codecs=opus", Data: make([]byte, 1000)}}}
	var s backendtest.Sink
	if _, err := b.Run(backendtest.Context(t), req, &s); err != nil {
		t.Fatal(err)
	}
	if want := "whisper-1 audio.webm audio/webm;codecs=opus 1000 bytes"; s.Text() != want {
		t.Fatalf("text %q, want %q", s.Text(), want)
	}
}

func TestFakeSpeak(t *testing.T) {
	audio := []byte("ID3 fake mp3 frames")
	var got map[string]any
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&got)
		w.Header().Set("Content-Type", "audio/mpeg")
		w.Write(audio)
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_TTS, Model: "tts-1", Prompt: "hello", Params: &pb.Params{Voice: "nova"}}
	var s backendtest.Sink
	if _, err := b.Run(backendtest.Context(t), req, &s); err != nil {
		t.Fatal(err)
	}
	if len(s.Mimes()) != 1 || s.Mimes()[0] != "audio/mpeg" || !bytes.Equal(s.MediaData()[0], audio) {
		t.Fatalf("media %v", s.Mimes())
	}
	if js, _ := json.Marshal(got); string(js) != `{"input":"hello","model":"tts-1","response_format":"mp3","voice":"nova"}` {
		t.Errorf("request %s", js)
	}

	huge := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "audio/wav")
		w.Write(make([]byte, protocol.MaxEventFrame+1))
	})
	_, err := huge.Run(backendtest.Context(t), req, &backendtest.Sink{})
	backendtest.WantCode(t, err, protocol.CodeTooLarge)
}

func TestFakeEmbedIndices(t *testing.T) {
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"data":[{"index":1,"embedding":[0.5]},{"index":0,"embedding":[0.25]}],"usage":{"prompt_tokens":4}}`)
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: "e", Inputs: []string{"a", "b"}}
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), req, &s)
	if es := s.Embeddings(); err != nil || len(es) != 2 || es[0][0] != 0.25 || es[1][0] != 0.5 || u.PromptTokens != 4 {
		t.Fatalf("embeds %v usage %+v err %v", es, u, err)
	}
	dup := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"data":[{"index":0,"embedding":[0.5]},{"index":0,"embedding":[0.25]}]}`)
	})
	_, err = dup.Run(backendtest.Context(t), req, &backendtest.Sink{})
	backendtest.WantCode(t, err, protocol.CodeBackendError)
}

func TestNewRejectsBadURL(t *testing.T) {
	for _, u := range []string{"", "localhost:8080", "ftp://x", "http://", "http://h/?q=1", "http://h/#x"} {
		if _, err := openai.New(u); err == nil {
			t.Errorf("New(%q) succeeded", u)
		}
	}
	if _, err := openai.New("http://x", openai.WithModelTypes(map[string][]pb.QueryType{"m": nil})); err == nil {
		t.Error("a declared model without types was accepted")
	}
}

// TestFakeChatWithoutParams: a request with no params at all (what `mtor
// query` and the seed's browser client send) is served, with no sampling
// fields in the backend request.
func TestFakeChatWithoutParams(t *testing.T) {
	var got map[string]any
	b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&got)
		io.WriteString(w, event("hi", "stop")+"data: [DONE]\n\n")
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Prompt: "hello"}
	var s backendtest.Sink
	if _, err := b.Run(backendtest.Context(t), req, &s); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"temperature", "top_p", "seed", "max_tokens"} {
		if _, ok := got[k]; ok {
			t.Errorf("request carries %s without params: %v", k, got)
		}
	}
	if s.Text() != "hi" {
		t.Fatalf("text %q", s.Text())
	}
}
