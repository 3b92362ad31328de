package ollama_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend/ollama"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// The servers here are protocol fakes of Ollama: each answers one request
// shape, well-formed or broken on purpose, which a real engine cannot be
// made to produce on demand.

func fakeOllama(t *testing.T, h http.HandlerFunc, opts ...ollama.Option) *ollama.Backend {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	opts = append([]ollama.Option{ollama.WithIdleTimeout(500 * time.Millisecond)}, opts...)
	b, err := ollama.New(srv.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestFakeErrorMapping(t *testing.T) {
	for _, c := range []struct {
		name   string
		status int
		body   string
		code   pb.ErrorCode
		msg    string
	}{
		{"bad request", 400, `{"error":"invalid options: num_predict"}`, protocol.CodeBadRequest, "invalid options: num_predict"},
		{"model not found", 404, `{"error":"model \"x\" not found, try pulling it first"}`, protocol.CodeUnsupported, "try pulling it first"},
		{"too large", 413, `{"error":"request entity too large"}`, protocol.CodeTooLarge, "too large"},
		{"busy", 503, `{"error":"server busy, please try again.  maximum pending requests exceeded"}`, protocol.CodeBusy, "server busy"},
		{"server error", 500, `{"error":"llama runner process has terminated"}`, protocol.CodeBackendError, "runner process has terminated"},
		{"plain text", 502, `bad gateway`, protocol.CodeBackendError, "bad gateway"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(c.status)
				io.WriteString(w, c.body)
			})
			_, err := b.Run(testCtx(t), chatReq("m", "hi", 4), &sink{})
			pe := wantCode(t, err, c.code)
			if !strings.Contains(pe.Message, c.msg) {
				t.Errorf("message %q does not contain %q", pe.Message, c.msg)
			}
		})
	}
}

func TestFakeBrokenStreams(t *testing.T) {
	line := func(s string) string {
		return `{"message":{"role":"assistant","content":"` + s + `"},"done":false}` + "\n"
	}
	for _, c := range []struct {
		name string
		send func(w http.ResponseWriter, r *http.Request)
		msg  string
	}{
		{"garbage", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, line("ok")+"<html>this is not json</html>\n")
		}, "malformed"},
		{"ends mid-answer", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, line("a")+line("b"))
		}, "ended before the answer"},
		{"error line", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, line("a")+`{"error":"an error was encountered while running the model"}`+"\n")
		}, "error was encountered"},
		{"endless line", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, `{"message":{"content":"`+strings.Repeat("x", 2<<20))
		}, "longer than the limit"},
		{"stalls", func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			io.WriteString(w, line("a"))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}, "sent nothing"},
		{"connection cut", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, line("a"))
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
		}, "closed the connection"},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := fakeOllama(t, c.send)
			_, err := b.Run(testCtx(t), chatReq("m", "hi", 4), &sink{})
			pe := wantCode(t, err, protocol.CodeBackendError)
			if !strings.Contains(pe.Message, c.msg) {
				t.Errorf("message %q does not contain %q", pe.Message, c.msg)
			}
		})
	}
}

func TestFakeConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	b, err := ollama.New("http://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Run(testCtx(t), chatReq("m", "hi", 4), &sink{})
	pe := wantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "refused") {
		t.Errorf("%v: want a retryable refusal", pe)
	}
}

func TestFakeDeadlineAndCancel(t *testing.T) {
	b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
		// Never answers. The body is read first: only then does the server
		// notice the client leaving and end the request's context.
		io.Copy(io.Discard, r.Body)
		<-r.Context().Done()
	}, ollama.WithIdleTimeout(time.Hour), ollama.WithWorkTimeout(time.Hour))

	ctx, cancel := context.WithTimeout(testCtx(t), 100*time.Millisecond)
	defer cancel()
	_, err := b.Run(ctx, chatReq("m", "hi", 4), &sink{})
	wantCode(t, err, protocol.CodeTimeout)

	ctx, cancel = context.WithCancel(testCtx(t))
	time.AfterFunc(50*time.Millisecond, cancel)
	_, err = b.Run(ctx, chatReq("m", "hi", 4), &sink{})
	wantCode(t, err, protocol.CodeCancelled)
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
	var s sink
	u, err := b.Run(testCtx(t), req, &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.text() != "I see a cat" || u.PromptTokens != 11 || u.CompletionTokens != 2 {
		t.Fatalf("text %q usage %+v", s.text(), u)
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
		ms, err := b.Models(testCtx(t))
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
	_, err := b.Run(testCtx(t), req, &sink{})
	wantCode(t, err, protocol.CodeBackendError)
}

func TestUnsupportedTypes(t *testing.T) {
	b, err := ollama.New("http://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, ty := range []pb.QueryType{pb.QueryType_QUERY_TYPE_IMAGINE, pb.QueryType_QUERY_TYPE_STT, pb.QueryType_QUERY_TYPE_TTS} {
		_, err := b.Run(testCtx(t), &pb.QueryRequest{Type: ty, Model: "m", Prompt: "x"}, &sink{})
		wantCode(t, err, protocol.CodeUnsupported)
	}
}

func TestNewRejectsBadURL(t *testing.T) {
	for _, u := range []string{"", "127.0.0.1:11434", "ftp://x", "http://", "http://h/?q=1", "http://h/#x"} {
		if _, err := ollama.New(u); err == nil {
			t.Errorf("New(%q) succeeded", u)
		}
	}
}
