package protocol

import (
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func weatherTool() *pb.Tool {
	return &pb.Tool{Name: "get_weather", Description: "Weather of a city",
		Parameters: `{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}`}
}

func TestValidateToolsAndFormats(t *testing.T) {
	ok := func(f func(r *pb.QueryRequest)) func(r *pb.QueryRequest) { return f }
	cases := []struct {
		name   string
		edit   func(r *pb.QueryRequest)
		substr string // "" = valid
	}{
		{"tool", ok(func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{weatherTool()} }), ""},
		{"tool without parameters", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "now"}} }, ""},
		{"bad tool name", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "get weather"}} }, "name"},
		{"long tool name", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: strings.Repeat("a", 65)}} }, "name"},
		{"duplicate tool", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{weatherTool(), weatherTool()} }, "twice"},
		{"too many tools", func(r *pb.QueryRequest) {
			for i := 0; i <= MaxTools; i++ {
				r.Tools = append(r.Tools, &pb.Tool{Name: "t" + itoa(i)})
			}
		}, "tools"},
		{"parameters not JSON", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "x", Parameters: "{"}} }, "parameters"},
		{"parameters an array", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "x", Parameters: "[]"}} }, "parameters"},
		{"parameters too big", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{{Name: "x", Parameters: `{"a":"` + strings.Repeat("x", MaxSchema) + `"}`}}
		}, "parameters"},
		{"description too long", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{{Name: "x", Description: strings.Repeat("d", MaxToolDesc+1)}}
		}, "description"},
		{"choice auto", func(r *pb.QueryRequest) { r.ToolChoice = &pb.ToolChoice{Mode: "auto"} }, ""},
		{"choice required without tools", func(r *pb.QueryRequest) { r.ToolChoice = &pb.ToolChoice{Mode: "required"} }, "required"},
		{"choice function", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{weatherTool()}
			r.ToolChoice = &pb.ToolChoice{Mode: "function", Name: "get_weather"}
		}, ""},
		{"choice unknown function", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{weatherTool()}
			r.ToolChoice = &pb.ToolChoice{Mode: "function", Name: "other"}
		}, "not among"},
		{"choice bad mode", func(r *pb.QueryRequest) { r.ToolChoice = &pb.ToolChoice{Mode: "always"} }, "mode"},
		{"choice name with auto", func(r *pb.QueryRequest) { r.ToolChoice = &pb.ToolChoice{Mode: "auto", Name: "x"} }, "only for mode"},
		{"round trip", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{weatherTool()}
			r.Messages = append(r.Messages,
				&pb.Message{Role: "assistant", ToolCalls: []*pb.ToolCall{{Id: "call_1", Name: "get_weather", Arguments: `{"city":"Oslo"}`}}},
				&pb.Message{Role: "tool", ToolCallId: "call_1", Name: "get_weather", Content: "sunny"})
		}, ""},
		{"tool calls on a user message", func(r *pb.QueryRequest) {
			r.Messages[0].ToolCalls = []*pb.ToolCall{{Id: "c", Name: "x"}}
		}, "only assistant"},
		{"tool call without id", func(r *pb.QueryRequest) {
			r.Messages = append(r.Messages, &pb.Message{Role: "assistant", ToolCalls: []*pb.ToolCall{{Name: "x"}}})
		}, "id"},
		{"tool_call_id on a user message", func(r *pb.QueryRequest) { r.Messages[0].ToolCallId = "c" }, "only tool"},
		{"json_object", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "json_object"} }, ""},
		{"json_object with schema", func(r *pb.QueryRequest) {
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_object", Schema: "{}"}
		}, "takes no"},
		{"json_schema", func(r *pb.QueryRequest) {
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Name: "city", Schema: `{"type":"object"}`, Strict: true}
		}, ""},
		{"json_schema without schema", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema"} }, "schema"},
		{"json_schema bad name", func(r *pb.QueryRequest) {
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Name: "a b", Schema: "{}"}
		}, "name"},
		{"format type unknown", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "yaml"} }, "response_format"},
		{"penalties", func(r *pb.QueryRequest) {
			r.Params = &pb.Params{PresencePenalty: f32(-2), FrequencyPenalty: f32(2)}
		}, ""},
		{"presence penalty high", func(r *pb.QueryRequest) { r.Params = &pb.Params{PresencePenalty: f32(2.5)} }, "presence_penalty"},
		{"frequency penalty NaN", func(r *pb.QueryRequest) { r.Params = &pb.Params{FrequencyPenalty: f32(nan32())} }, "frequency_penalty"},
		{"logprobs", func(r *pb.QueryRequest) { r.Params = &pb.Params{Logprobs: true, TopLogprobs: 20} }, ""},
		{"top_logprobs over", func(r *pb.QueryRequest) { r.Params = &pb.Params{Logprobs: true, TopLogprobs: 21} }, "top_logprobs"},
		{"top_logprobs without logprobs", func(r *pb.QueryRequest) { r.Params = &pb.Params{TopLogprobs: 2} }, "needs logprobs"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := validChat()
			c.edit(r)
			err := ValidateRequest(r)
			if c.substr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			wantBadRequest(t, err, c.substr)
		})
	}
}

func nan32() float32 {
	var z float32
	return z / z
}

func TestRequiredFeatures(t *testing.T) {
	cases := []struct {
		name string
		edit func(r *pb.QueryRequest)
		want string
	}{
		{"plain", func(*pb.QueryRequest) {}, ""},
		{"tools", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{weatherTool()} }, "tools"},
		{"tool message only", func(r *pb.QueryRequest) {
			r.Messages = append(r.Messages, &pb.Message{Role: "tool", ToolCallId: "c1", Content: "42"})
		}, "tools"},
		{"text format", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "text"} }, ""},
		{"json_object", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "json_object"} }, "json_object"},
		{"everything", func(r *pb.QueryRequest) {
			r.Tools = []*pb.Tool{weatherTool()}
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Schema: "{}"}
			r.Params = &pb.Params{Logprobs: true, Seed: i64(1)}
		}, "tools,json_schema,logprobs"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := validChat()
			c.edit(r)
			if got := strings.Join(RequiredFeatures(r), ","); got != c.want {
				t.Fatalf("RequiredFeatures = %q, want %q", got, c.want)
			}
		})
	}
}

func TestValidateNewEvents(t *testing.T) {
	ev := func(k any) *pb.Event {
		switch k := k.(type) {
		case *pb.ToolCallDelta:
			return &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: k}}
		case *pb.Chunk:
			return &pb.Event{Kind: &pb.Event_Chunk{Chunk: k}}
		case *pb.Done:
			return &pb.Event{Kind: &pb.Event_Done{Done: k}}
		}
		panic("kind")
	}
	cases := []struct {
		name  string
		e     *pb.Event
		valid bool
	}{
		{"tool call", ev(&pb.ToolCallDelta{Index: 0, Id: "call_1", Name: "get_weather", Arguments: `{"ci`}), true},
		{"tool call index over", ev(&pb.ToolCallDelta{Index: MaxToolCalls}), false},
		{"tool call long fragment", ev(&pb.ToolCallDelta{Arguments: strings.Repeat("a", MaxChunkText+1)}), false},
		{"logprobs", ev(&pb.Chunk{Text: "hi", Logprobs: []*pb.TokenLogprob{{Token: "hi", Logprob: -0.5,
			Top: []*pb.TopLogprob{{Token: "ho", Logprob: MinLogprob}}}}}), true},
		{"positive logprob", ev(&pb.Chunk{Text: "hi", Logprobs: []*pb.TokenLogprob{{Token: "hi", Logprob: 0.5}}}), false},
		{"NaN logprob", ev(&pb.Chunk{Text: "hi", Logprobs: []*pb.TokenLogprob{{Token: "hi", Logprob: nan32()}}}), false},
		{"too many top", ev(&pb.Chunk{Logprobs: []*pb.TokenLogprob{{Top: make([]*pb.TopLogprob, MaxTopLogprobs+1)}}}), false},
		{"finish tool_calls", ev(&pb.Done{FinishReason: FinishToolCalls}), true},
		{"finish unknown", ev(&pb.Done{FinishReason: "eos"}), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateEvent(c.e)
			if c.valid != (err == nil) {
				t.Fatalf("ValidateEvent = %v, want valid %v", err, c.valid)
			}
		})
	}
}
