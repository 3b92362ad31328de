package ollama_test

import (
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
	"github.com/mtor-swarm/mtor/node/backend/ollama"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// The servers here are protocol fakes of Ollama: each answers one request
// shape, well-formed or broken on purpose, which a real engine cannot be
// made to produce on demand.

func fakeOllama(t *testing.T, h http.HandlerFunc, opts ...ollama.Option) *ollama.Backend {
	t.Helper()
	opts = append([]ollama.Option{ollama.WithIdleTimeout(500 * time.Millisecond)}, opts...)
	return backendtest.New(t, ollama.New, backendtest.Serve(t, h), opts...)
}

// chatTo is the error of one chat query to a fake serving answer.
func chatTo(t *testing.T, answer http.HandlerFunc) error {
	_, err := fakeOllama(t, answer).Run(backendtest.Context(t), backendtest.ChatRequest("m", "hi", 4), &backendtest.Sink{})
	return err
}

func TestFakeErrorMapping(t *testing.T) {
	respond := backendtest.Respond
	backendtest.RunErrorCases(t, []backendtest.ErrorCase{
		{Name: "bad request", Answer: respond(400, `{"error":"invalid options: num_predict"}`), Code: protocol.CodeBadRequest, Msg: "invalid options: num_predict"},
		{Name: "model not found", Answer: respond(404, `{"error":"model \"x\" not found, try pulling it first"}`), Code: protocol.CodeUnsupported, Msg: "try pulling it first"},
		{Name: "too large", Answer: respond(413, `{"error":"request entity too large"}`), Code: protocol.CodeTooLarge, Msg: "too large"},
		{Name: "busy", Answer: respond(503, `{"error":"server busy, please try again.  maximum pending requests exceeded"}`), Code: protocol.CodeBusy, Msg: "server busy"},
		{Name: "server error", Answer: respond(500, `{"error":"llama runner process has terminated"}`), Code: protocol.CodeBackendError, Msg: "runner process has terminated"},
		{Name: "plain text", Answer: respond(502, `bad gateway`), Code: protocol.CodeBackendError, Msg: "bad gateway"},
	}, chatTo)
}

func TestFakeBrokenStreams(t *testing.T) {
	line := func(s string) string {
		return `{"message":{"role":"assistant","content":"` + s + `"},"done":false}` + "\n"
	}
	write := func(body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) }
	}
	backendtest.RunErrorCases(t, []backendtest.ErrorCase{
		{Name: "garbage", Answer: write(line("ok") + "<html>this is not json</html>\n"), Code: protocol.CodeBackendError, Msg: "malformed"},
		{Name: "ends mid-answer", Answer: write(line("a") + line("b")), Code: protocol.CodeBackendError, Msg: "ended before the answer"},
		{Name: "error line", Answer: write(line("a") + `{"error":"an error was encountered while running the model"}` + "\n"), Code: protocol.CodeBackendError, Msg: "error was encountered"},
		{Name: "endless line", Answer: write(`{"message":{"content":"` + strings.Repeat("x", 2<<20)), Code: protocol.CodeBackendError, Msg: "longer than the limit"},
		{Name: "stalls", Answer: backendtest.StallAfter(line("a")), Code: protocol.CodeBackendError, Msg: "sent nothing"},
		{Name: "connection cut", Answer: backendtest.CutAfter(line("a")), Code: protocol.CodeBackendError, Msg: "closed the connection"},
	}, chatTo)
}

func TestFakeConnectionRefused(t *testing.T) {
	b := backendtest.New(t, ollama.New, backendtest.DeadURL(t))
	backendtest.CheckServerDown(t, b, backendtest.ChatRequest("m", "hi", 4))
}

func TestFakeDeadlineAndCancel(t *testing.T) {
	// Timeouts far beyond the test's: only the query's deadline or
	// cancellation can end it.
	patient := func(h http.HandlerFunc) backend.Backend {
		return fakeOllama(t, h, ollama.WithIdleTimeout(time.Hour), ollama.WithWorkTimeout(time.Hour))
	}
	backendtest.CheckDeadline(t, patient, backendtest.ChatRequest("m", "hi", 4))
	backendtest.CheckCancel(t, patient, backendtest.ChatRequest("m", "hi", 4))
}

// TestFakeChatRequestShape checks what the backend sends: streaming on,
// images as base64 in the message, parameters as options.
func TestFakeChatRequestShape(t *testing.T) {
	var got map[string]any
	b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/chat" {
			t.Errorf("path %s", r.URL.Path)
		}
		json.NewDecoder(r.Body).Decode(&got)
		io.WriteString(w, `{"message":{"content":"I see "},"done":false}`+"\n"+
			`{"message":{"content":"a cat"},"done":false}`+"\n"+
			`{"message":{"content":""},"done":true,"done_reason":"stop","prompt_eval_count":11,"eval_count":2}`+"\n")
	})
	temp := float32(0.5)
	req := &pb.QueryRequest{
		Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_VISION, Model: "llava",
		Messages: []*pb.Message{
			{Role: "system", Content: "be brief"},
			{Role: "user", Content: "what is it?", Attachments: []*pb.Attachment{{Mime: "image/png", Data: []byte("PNGDATA")}}},
		},
		Params: &pb.Params{MaxTokens: 9, Temperature: &temp, Stop: []string{"\n"}},
	}
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), req, &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Text() != "I see a cat" || u.PromptTokens != 11 || u.CompletionTokens != 2 {
		t.Fatalf("text %q usage %+v", s.Text(), u)
	}
	want := `{"messages":[{"content":"be brief","role":"system"},{"content":"what is it?","images":["UE5HREFUQQ=="],"role":"user"}],` +
		`"model":"llava","options":{"num_predict":9,"stop":["\n"],"temperature":0.5},"stream":true}`
	if js, _ := json.Marshal(got); string(js) != want {
		t.Fatalf("request\n%s\nwant\n%s", js, want)
	}
}

// TestFakeModels checks capabilities and context length from /api/show,
// the fallback guess when /api/show fails, and that /api/show is asked
// once per model digest.
func TestFakeModels(t *testing.T) {
	var shows atomic.Int32
	b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/tags":
			io.WriteString(w, `{"models":[
				{"name":"gemma3:4b","digest":"aa","details":{"family":"gemma3"}},
				{"name":"nomic-embed-text:latest","digest":"bb","details":{"family":"nomic-bert"}},
				{"name":"old:latest","digest":"cc","details":{"family":"llama","families":["llama","clip"]}}]}`)
		case "/api/show":
			shows.Add(1)
			var req struct{ Model string }
			json.NewDecoder(r.Body).Decode(&req)
			switch req.Model {
			case "gemma3:4b":
				io.WriteString(w, `{"capabilities":["completion","vision","tools"],"model_info":{"gemma3.context_length":131072,"gemma3.embedding_length":2560}}`)
			case "nomic-embed-text:latest":
				io.WriteString(w, `{"capabilities":["embedding"],"model_info":{"nomic-bert.context_length":2048}}`)
			default:
				w.WriteHeader(500)
			}
		default:
			w.WriteHeader(404)
		}
	})
	want := "gemma3:4b [chat vision] 131072; nomic-embed-text:latest [embed] 2048; old:latest [chat vision] 0; "
	for range 2 {
		ms, err := b.Models(backendtest.Context(t))
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		for _, m := range ms {
			var types []string
			for _, ty := range m.Types {
				types = append(types, protocol.TypeName(ty))
			}
			got += fmt.Sprintf("%s %v %d; ", m.Name, types, m.ContextLength)
		}
		if got != want {
			t.Fatalf("Models = %s\nwant     %s", got, want)
		}
	}
	// Two listings: the two good models are shown once, the failing one twice.
	if n := shows.Load(); n != 4 {
		t.Errorf("/api/show called %d times, want 4", n)
	}
}

func TestFakeEmbedCountMismatch(t *testing.T) {
	b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"embeddings":[[0.1,0.2]]}`)
	})
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: "m", Inputs: []string{"a", "b"}}
	_, err := b.Run(backendtest.Context(t), req, &backendtest.Sink{})
	backendtest.WantCode(t, err, protocol.CodeBackendError)
}

func TestUnsupportedTypes(t *testing.T) {
	b, err := ollama.New("http://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, ty := range []pb.QueryType{pb.QueryType_QUERY_TYPE_IMAGINE, pb.QueryType_QUERY_TYPE_STT, pb.QueryType_QUERY_TYPE_TTS} {
		_, err := b.Run(backendtest.Context(t), &pb.QueryRequest{Type: ty, Model: "m", Prompt: "x"}, &backendtest.Sink{})
		backendtest.WantCode(t, err, protocol.CodeUnsupported)
	}
}

func TestNewRejectsBadURL(t *testing.T) {
	for _, u := range []string{"", "127.0.0.1:11434", "ftp://x", "http://", "http://h/?q=1", "http://h/#x"} {
		if _, err := ollama.New(u); err == nil {
			t.Errorf("New(%q) succeeded", u)
		}
	}
}
