package bridge

import (
	"encoding/json"
	"fmt"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestChatToQueryTools: tools, tool_choice, tool messages,
// response_format, logprobs and penalties become protocol fields; what the
// swarm cannot honour is a 400 naming the parameter.
func TestChatToQueryTools(t *testing.T) {
	const user = `"messages":[{"role":"user","content":"x"}]`
	const tool = `"tools":[{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type": "object"}}}]`
	tests := []struct {
		name   string
		body   string
		want   string // protojson of the fields checked, "" = error
		pick   func(q *pb.QueryRequest) any
		param  string
		status int
	}{
		{name: "tools", body: `{"model":"m",` + user + `,` + tool + `,"tool_choice":{"type":"function","function":{"name":"get_weather"}}}`,
			pick: func(q *pb.QueryRequest) any {
				return &pb.QueryRequest{Tools: q.Tools, ToolChoice: q.ToolChoice}
			},
			want: `{"tools":[{"name":"get_weather","description":"d","parameters":"{\"type\":\"object\"}"}],"toolChoice":{"mode":"function","name":"get_weather"}}`},
		{name: "tool round trip", body: `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"sunny"}],` + tool + `}`,
			pick: func(q *pb.QueryRequest) any { return &pb.QueryRequest{Messages: q.Messages[1:]} },
			want: `{"messages":[{"role":"assistant","toolCalls":[{"id":"c1","name":"get_weather","arguments":"{}"}]},{"role":"tool","content":"sunny","toolCallId":"c1"}]}`},
		{name: "json_schema", body: `{"model":"m",` + user + `,"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object"},"strict":true}}}`,
			pick: func(q *pb.QueryRequest) any { return q.ResponseFormat },
			want: `{"type":"json_schema","name":"w","schema":"{\"type\":\"object\"}","strict":true}`},
		{name: "tool parameters not UTF-8", body: `{"model":"m",` + user + `,"tools":[{"type":"function","function":{"name":"a","parameters":{"description":"caf` + "\xff" + `"}}}]}`,
			pick: func(q *pb.QueryRequest) any { return &pb.QueryRequest{Tools: q.Tools} },
			want: `{"tools":[{"name":"a","parameters":"{\"description\":\"caf\uFFFD\"}"}]}`},
		{name: "schema not UTF-8", body: `{"model":"m",` + user + `,"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{"title":"` + "\xff" + `"}}}}`,
			pick: func(q *pb.QueryRequest) any { return q.ResponseFormat },
			want: `{"type":"json_schema","name":"w","schema":"{\"title\":\"\uFFFD\"}"}`},
		{name: "text format is no constraint", body: `{"model":"m",` + user + `,"response_format":{"type":"text"}}`,
			pick: func(q *pb.QueryRequest) any { return &pb.QueryRequest{ResponseFormat: q.ResponseFormat} }, want: `{}`},
		{name: "sampling", body: `{"model":"m",` + user + `,"logprobs":true,"top_logprobs":3,"presence_penalty":0.5,"frequency_penalty":-1,"seed":9}`,
			pick: func(q *pb.QueryRequest) any { return q.Params },
			want: `{"seed":"9","presencePenalty":0.5,"frequencyPenalty":-1,"logprobs":true,"topLogprobs":3}`},
		{name: "tool choice without tools", body: `{"model":"m",` + user + `,"tool_choice":"required"}`, status: 400, param: "tool_choice"},
		{name: "tool choice unknown", body: `{"model":"m",` + user + `,` + tool + `,"tool_choice":"sometimes"}`, status: 400, param: "tool_choice"},
		{name: "tool of other type", body: `{"model":"m",` + user + `,"tools":[{"type":"code_interpreter"}]}`, status: 400, param: "tools[0].type"},
		{name: "tool without name", body: `{"model":"m",` + user + `,"tools":[{"type":"function","function":{}}]}`, status: 400, param: "tools[0].function.name"},
		{name: "tool parameters not a schema", body: `{"model":"m",` + user + `,"tools":[{"type":"function","function":{"name":"a","parameters":"x"}}]}`, status: 400, param: "tools[0].function.parameters"},
		{name: "tool name invalid", body: `{"model":"m",` + user + `,"tools":[{"type":"function","function":{"name":"a b"}}]}`, status: 400},
		{name: "tool message without id", body: `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"tool","content":"y"}]}`, status: 400, param: "messages[1].tool_call_id"},
		{name: "user with tool calls", body: `{"model":"m","messages":[{"role":"user","content":"x","tool_calls":[{"id":"c","function":{"name":"a","arguments":"{}"}}]}]}`, status: 400, param: "messages[0].tool_calls"},
		{name: "format unknown", body: `{"model":"m",` + user + `,"response_format":{"type":"yaml"}}`, status: 400, param: "response_format.type"},
		{name: "schema missing", body: `{"model":"m",` + user + `,"response_format":{"type":"json_schema"}}`, status: 400, param: "response_format.json_schema"},
		{name: "schema without a name", body: `{"model":"m",` + user + `,"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object"}}}}`, status: 400, param: "response_format.json_schema.name"},
		{name: "top_logprobs without logprobs", body: `{"model":"m",` + user + `,"top_logprobs":2}`, status: 400, param: "top_logprobs"},
		{name: "top_logprobs over", body: `{"model":"m",` + user + `,"logprobs":true,"top_logprobs":21}`, status: 400, param: "top_logprobs"},
		{name: "penalty over", body: `{"model":"m",` + user + `,"presence_penalty":2.5}`, status: 400, param: "presence_penalty"},
		{name: "logit_bias", body: `{"model":"m",` + user + `,"logit_bias":{"1":2}}`, status: 400, param: "logit_bias"},
		{name: "empty logit_bias", body: `{"model":"m",` + user + `,"logit_bias":{}}`, pick: func(q *pb.QueryRequest) any { return &pb.QueryRequest{} }, want: `{}`},
		{name: "functions", body: `{"model":"m",` + user + `,"functions":[{"name":"a"}]}`, status: 400, param: "functions"},
		{name: "audio", body: `{"model":"m",` + user + `,"audio":{"voice":"x"}}`, status: 400, param: "audio"},
		{name: "modalities audio", body: `{"model":"m",` + user + `,"modalities":["text","audio"]}`, status: 400, param: "modalities"},
		{name: "parallel_tool_calls false", body: `{"model":"m",` + user + `,` + tool + `,"parallel_tool_calls":false}`, status: 400, param: "parallel_tool_calls"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var req chatRequest
			if err := json.Unmarshal([]byte(tc.body), &req); err != nil {
				t.Fatalf("test body: %v", err)
			}
			q, aerr := chatToQuery(&req, limits{maxMedia: 1000})
			if tc.status != 0 {
				if aerr == nil || aerr.Status != tc.status || (tc.param != "" && aerr.Param != tc.param) {
					t.Fatalf("got %v, want %d param %q", aerr, tc.status, tc.param)
				}
				return
			}
			if aerr != nil {
				t.Fatal(aerr)
			}
			got, _ := protojson.Marshal(tc.pick(q).(interface {
				ProtoReflect() protoreflect.Message
			}))
			var a, b any
			_ = json.Unmarshal(got, &a)
			_ = json.Unmarshal([]byte(tc.want), &b)
			ga, _ := json.Marshal(a)
			gb, _ := json.Marshal(b)
			if string(ga) != string(gb) {
				t.Errorf("got\n%s\nwant\n%s", ga, gb)
			}
		})
	}
}

// TestOllamaToolResultsCarryTheCallID: Ollama's tool messages name the
// function, not the call; each gets the id of the first call of that
// function not yet answered (OpenAI-compatible servers need it as
// tool_call_id), in order, as Ollama's clients answer them.
func TestOllamaToolResultsCarryTheCallID(t *testing.T) {
	s, err := New(&fakeSwarm{})
	if err != nil {
		t.Fatal(err)
	}
	call := func(name string) ollamaToolCall {
		var c ollamaToolCall
		c.Function.Name = name
		c.Function.Arguments = json.RawMessage(`{}`)
		return c
	}
	for _, tc := range []struct {
		name  string
		calls []string // of the assistant message
		tools []string // tool_name of the answers ("" for none)
		want  []string // their tool_call_id
	}{
		{"one call", []string{"weather"}, []string{"weather"}, []string{"call_1_0"}},
		{"two functions, answered out of order", []string{"weather", "time"}, []string{"time", "weather"}, []string{"call_1_1", "call_1_0"}},
		{"one function twice", []string{"weather", "weather"}, []string{"weather", "weather"}, []string{"call_1_0", "call_1_1"}},
		{"answers without a name, in order", []string{"weather", "time"}, []string{"", ""}, []string{"call_1_0", "call_1_1"}},
		{"an answer to no call", []string{"weather"}, []string{"weather", "weather"}, []string{"call_1_0", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := ollamaChatRequest{Model: "m", Messages: []ollamaMessage{{Role: "user", Content: "x"}, {Role: "assistant"}}}
			for _, n := range tc.calls {
				req.Messages[1].ToolCalls = append(req.Messages[1].ToolCalls, call(n))
			}
			for _, n := range tc.tools {
				req.Messages = append(req.Messages, ollamaMessage{Role: "tool", ToolName: n, Content: "r"})
			}
			q, aerr := s.ollamaChatQuery(&req)
			if aerr != nil {
				t.Fatal(aerr)
			}
			var got []string
			for _, m := range q.Messages[2:] {
				got = append(got, m.GetToolCallId())
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("tool_call_ids %q, want %q", got, tc.want)
			}
		})
	}
}
