package ollama_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestFakeToolCallsPassThrough: a fake Ollama records the /api/chat body
// and answers with a tool call (whole, in one line, as Ollama sends it).
func TestFakeToolCallsPassThrough(t *testing.T) {
	var rec backendtest.JSONRecorder
	b := fakeOllama(t, rec.Handler(func(w http.ResponseWriter) {
		io.WriteString(w, `{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Oslo"}}}]},"done":false}`+"\n"+
			`{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":30,"eval_count":12}`+"\n")
	}))
	q := backendtest.ChatRequest("m", "weather?", 32)
	q.Messages = append(q.Messages,
		&pb.Message{Role: "assistant", ToolCalls: []*pb.ToolCall{{Id: "c0", Name: "get_weather", Arguments: `{"city":"Paris"}`}}},
		&pb.Message{Role: "tool", ToolCallId: "c0", Name: "get_weather", Content: "rain"})
	q.Tools = []*pb.Tool{{Name: "get_weather", Parameters: `{"type":"object"}`}, {Name: "other"}}
	q.ToolChoice = &pb.ToolChoice{Mode: "function", Name: "get_weather"}
	q.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Schema: `{"type":"object"}`}
	q.Params.PresencePenalty = proto.Float32(1)
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), q, &s)
	if err != nil {
		t.Fatal(err)
	}
	calls := s.ToolCalls()
	if len(calls) != 1 || calls[0].GetName() != "get_weather" || calls[0].GetArguments() != `{"city":"Oslo"}` || calls[0].GetId() == "" {
		t.Fatalf("tool calls %v", calls)
	}
	if u.FinishReason != protocol.FinishToolCalls || u.CompletionTokens != 12 {
		t.Fatalf("usage %+v", u)
	}
	got := rec.Body()
	enc := func(v any) string { b, _ := json.Marshal(v); return string(b) }
	if w := `[{"function":{"name":"get_weather","parameters":{"type":"object"}},"type":"function"}]`; enc(got["tools"]) != w {
		t.Errorf("tools %s, want %s (tool_choice function keeps only that tool)", enc(got["tools"]), w)
	}
	if enc(got["format"]) != `{"type":"object"}` {
		t.Errorf("format %s", enc(got["format"]))
	}
	if w := `[{"content":"weather?","role":"user"},{"content":"","role":"assistant","tool_calls":[{"function":{"arguments":{"city":"Paris"},"name":"get_weather"},"id":"c0"}]},{"content":"rain","role":"tool","tool_name":"get_weather"}]`; enc(got["messages"]) != w {
		t.Errorf("messages\n%s\nwant\n%s", enc(got["messages"]), w)
	}
	if enc(got["options"].(map[string]any)["presence_penalty"]) != "1" {
		t.Errorf("options %v", got["options"])
	}
}

// TestFakeCapabilitiesBecomeFeatures: /api/show's capabilities decide the
// announced features.
func TestFakeCapabilitiesBecomeFeatures(t *testing.T) {
	b := fakeOllama(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/tags":
			io.WriteString(w, `{"models":[{"name":"qwen3:0.6b","digest":"a"},{"name":"old:1b","digest":"b"}]}`)
		case "/api/show":
			body, _ := io.ReadAll(r.Body)
			if json.Valid(body) && string(body) == `{"model":"qwen3:0.6b"}` {
				io.WriteString(w, `{"capabilities":["completion","tools","thinking"]}`)
				return
			}
			io.WriteString(w, `{"capabilities":["completion"]}`)
		}
	})
	ms, err := b.Models(backendtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"qwen3:0.6b": "json_object,json_schema,continue,tools", "old:1b": "json_object,json_schema,continue"}
	for _, m := range ms {
		b, _ := json.Marshal(m.Features)
		if w := want[m.Name]; string(b) != `["`+strings.ReplaceAll(w, ",", `","`)+`"]` {
			t.Errorf("%s features %s, want %s", m.Name, b, w)
		}
	}
}
