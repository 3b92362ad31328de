package bridge

import (
	"encoding/json"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestAnswerShapes: a non-streamed answer in OpenAI's exact shapes: tool
// calls merged from deltas, content null when the model only called
// tools, logprobs with bytes.
func TestAnswerShapes(t *testing.T) {
	tc := func(i uint32, id, name, args string) *pb.Event {
		return &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Index: i, Id: id, Name: name, Arguments: args}}}
	}
	chunk := func(text string, lps ...*pb.TokenLogprob) *pb.Event {
		return &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text, Logprobs: lps}}}
	}
	cases := []struct {
		name     string
		events   []*pb.Event
		logprobs bool
		message  string
		lps      string
	}{
		{"text", []*pb.Event{chunk("hel"), chunk("lo")}, false,
			`{"role":"assistant","content":"hello","refusal":null}`, `null`},
		{"empty text", nil, false, `{"role":"assistant","content":"","refusal":null}`, `null`},
		{"tool calls only", []*pb.Event{tc(0, "call_1", "get_weather", `{"city":`), tc(0, "", "", `"Oslo"}`), tc(1, "call_2", "now", "{}")}, false,
			`{"role":"assistant","refusal":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}},{"id":"call_2","type":"function","function":{"name":"now","arguments":"{}"}}],"content":null}`, `null`},
		{"a skipped index is no call", []*pb.Event{tc(2, "c", "now", "{}")}, false,
			`{"role":"assistant","refusal":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"now","arguments":"{}"}}],"content":null}`, `null`},
		{"text and a call", []*pb.Event{chunk("Let me check."), tc(0, "c", "now", "{}")}, false,
			`{"role":"assistant","content":"Let me check.","refusal":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"now","arguments":"{}"}}]}`, `null`},
		{"logprobs", []*pb.Event{chunk("hi", &pb.TokenLogprob{Token: "hi", Logprob: -0.5, Top: []*pb.TopLogprob{{Token: "ho", Logprob: -2}}})}, true,
			`{"role":"assistant","content":"hi","refusal":null}`,
			`{"content":[{"token":"hi","logprob":-0.5,"bytes":[104,105],"top_logprobs":[{"token":"ho","logprob":-2,"bytes":[104,111]}]}],"refusal":null}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := answer{max: DefaultMaxAnswer}
			for _, ev := range c.events {
				if !a.add(ev, c.logprobs) {
					t.Fatal("overflow")
				}
			}
			m, _ := json.Marshal(a.message())
			if string(m) != c.message {
				t.Errorf("message\n%s\nwant\n%s", m, c.message)
			}
			q := &pb.QueryRequest{Params: &pb.Params{Logprobs: c.logprobs}}
			l, _ := json.Marshal(a.logprobsOut(q))
			if string(l) != c.lps {
				t.Errorf("logprobs\n%s\nwant\n%s", l, c.lps)
			}
		})
	}
}
