package openai_test

import (
	"encoding/json"
	"io"
	"net/http"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestFakeToolCallsPassThrough: a fake OpenAI-compatible server records
// the request the backend sends and streams a tool call in fragments (as
// vLLM and llama.cpp do), logprobs and a finish reason; the backend must
// pass every field through and map the answer back.
func TestFakeToolCallsPassThrough(t *testing.T) {
	var rec backendtest.JSONRecorder
	b := fakeOpenAI(t, rec.Handler(func(w http.ResponseWriter) {
		io.WriteString(w, `data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"ok","tool_calls":null},"logprobs":{"content":[{"token":"ok","logprob":-0.25,"bytes":[111,107],"top_logprobs":[{"token":"ok","logprob":-0.25,"bytes":[111,107]},{"token":"no","logprob":-1.5,"bytes":[110,111]}]}]},"finish_reason":null}]}`+"\n\n"+
			`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}`+"\n\n"+
			`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}]}`+"\n\n"+
			`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]},"finish_reason":null}]}`+"\n\n"+
			`data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}`+"\n\n"+
			`data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":9}}`+"\n\ndata: [DONE]\n\n")
	}), openai.WithFeatures(protocol.FeatureTools, protocol.FeatureLogprobs))

	q := backendtest.ChatRequest("m", "weather in Oslo?", 64)
	q.Messages = append(q.Messages,
		&pb.Message{Role: "assistant", ToolCalls: []*pb.ToolCall{{Id: "call_0", Name: "get_weather", Arguments: `{"city":"Paris"}`}}},
		&pb.Message{Role: "tool", ToolCallId: "call_0", Content: "rain"})
	q.Tools = []*pb.Tool{{Name: "get_weather", Description: "Weather", Parameters: `{"type":"object","properties":{"city":{"type":"string"}}}`}}
	q.ToolChoice = &pb.ToolChoice{Mode: "function", Name: "get_weather"}
	q.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Name: "w", Schema: `{"type":"object"}`, Strict: true}
	q.Params.Logprobs, q.Params.TopLogprobs = true, 2
	q.Params.PresencePenalty, q.Params.FrequencyPenalty = proto.Float32(0.5), proto.Float32(-0.5)
	q.Params.Seed = proto.Int64(7)
	q.Params.Stop = []string{"END"}
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), q, &s)
	if err != nil {
		t.Fatal(err)
	}
	if u.FinishReason != protocol.FinishToolCalls || u.CompletionTokens != 9 {
		t.Errorf("usage %+v, want finish tool_calls and 9 tokens", u)
	}
	calls := s.ToolCalls()
	if len(calls) != 1 || calls[0].GetId() != "call_abc" || calls[0].GetName() != "get_weather" || calls[0].GetArguments() != `{"city":"Oslo"}` {
		t.Errorf("tool calls %v", calls)
	}
	lps := s.Logprobs()
	if len(lps) != 1 || lps[0].GetToken() != "ok" || lps[0].GetLogprob() != -0.25 || len(lps[0].GetTop()) != 2 || lps[0].GetBytes() != nil {
		t.Errorf("logprobs %v", lps)
	}

	got := rec.Body()
	want := map[string]string{
		"tools":             `[{"function":{"description":"Weather","name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},"type":"object"}},"type":"function"}]`,
		"tool_choice":       `{"function":{"name":"get_weather"},"type":"function"}`,
		"response_format":   `{"json_schema":{"name":"w","schema":{"type":"object"},"strict":true},"type":"json_schema"}`,
		"logprobs":          `true`,
		"top_logprobs":      `2`,
		"presence_penalty":  `0.5`,
		"frequency_penalty": `-0.5`,
		"seed":              `7`,
		"stop":              `["END"]`,
	}
	for k, v := range want {
		b, _ := json.Marshal(got[k])
		if string(b) != v {
			t.Errorf("request %s = %s, want %s", k, b, v)
		}
	}
	msgs, _ := json.Marshal(got["messages"])
	if w := `[{"content":"weather in Oslo?","role":"user"},{"content":null,"role":"assistant","tool_calls":[{"function":{"arguments":"{\"city\":\"Paris\"}","name":"get_weather"},"id":"call_0","type":"function"}]},{"content":"rain","role":"tool","tool_call_id":"call_0"}]`; string(msgs) != w {
		t.Errorf("messages\n%s\nwant\n%s", msgs, w)
	}
}

// TestFakeContinuation: a continuation is sent as a final assistant
// message, with vLLM's flags, and the server's text is all that follows.
func TestFakeContinuation(t *testing.T) {
	var rec backendtest.JSONRecorder
	b := fakeOpenAI(t, rec.Handler(func(w http.ResponseWriter) {
		io.WriteString(w, event(" world", "")+event("", "length")+"data: [DONE]\n\n")
	}), openai.WithFeatures(protocol.FeatureContinue))
	q := backendtest.ChatRequest("m", "say hello world", 8)
	q.Continuation = "hello"
	var s backendtest.Sink
	u, err := b.Run(backendtest.Context(t), q, &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Text() != " world" || u.FinishReason != protocol.FinishLength {
		t.Fatalf("text %q finish %q", s.Text(), u.FinishReason)
	}
	got := rec.Body()
	msgs, _ := json.Marshal(got["messages"])
	if string(msgs) != `[{"content":"say hello world","role":"user"},{"content":"hello","role":"assistant"}]` || got["continue_final_message"] != true || got["add_generation_prompt"] != false {
		t.Fatalf("request %v", got)
	}
}

func TestFeaturesAreDeclared(t *testing.T) {
	if _, err := openai.New("http://127.0.0.1:1", openai.WithFeatures("telepathy")); err == nil {
		t.Fatal("an unknown feature was accepted")
	}
	b := fakeOpenAI(t, backendtest.Respond(200, `{"data":[{"id":"chat-model"},{"id":"nomic-embed-text"}]}`), openai.WithFeatures(protocol.FeatureTools))
	ms, err := b.Models(backendtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.HasFeature(protocol.FeatureTools) != (m.Name == "chat-model") {
			t.Errorf("model %s features %v", m.Name, m.Features)
		}
	}
}

// TestLogprobBytesOutOfRange: a server's logprob "bytes" that are no bytes
// (below 0, above 255) make the answer malformed, a BACKEND_ERROR, instead
// of being cut down to other bytes.
func TestLogprobBytesOutOfRange(t *testing.T) {
	for _, bs := range []string{"[-1]", "[300]", "[97,1000]"} {
		b := fakeOpenAI(t, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, `data: {"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[{"token":"\u00e9","logprob":-1,"bytes":`+bs+`,"top_logprobs":[]}]},"finish_reason":null}]}`+"\n\ndata: [DONE]\n\n")
		}, openai.WithFeatures(protocol.FeatureLogprobs))
		q := backendtest.ChatRequest("m", "hi", 4)
		q.Params.Logprobs = true
		var s backendtest.Sink
		_, err := b.Run(t.Context(), q, &s)
		if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBackendError {
			t.Fatalf("bytes %s: %v, want BACKEND_ERROR", bs, err)
		}
	}
}
