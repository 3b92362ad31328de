package worker

import (
	"context"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// toolCaller is a fake backend (no model behind it) that announces the
// features it is given and answers every query with one tool call in two
// fragments and a logprob chunk, the way a real backend's Run reports them.
type toolCaller struct{ features []string }

func (f *toolCaller) Kind() string                { return "fake" }
func (f *toolCaller) Name() string                { return "fake tool caller" }
func (f *toolCaller) Probe(context.Context) error { return nil }
func (f *toolCaller) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: "demo", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Features: f.features}}, nil
}
func (f *toolCaller) Run(_ context.Context, _ *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if err := backend.SendLogprobs(out, "x", []*pb.TokenLogprob{{Token: "x", Logprob: float32(negInf())}}); err != nil {
		return backend.Usage{}, err
	}
	for _, d := range []*pb.ToolCallDelta{{Index: 0, Id: "call_1", Name: "get_weather", Arguments: `{"city":`}, {Index: 0, Arguments: `"Oslo"}`}} {
		if err := backend.SendToolCall(out, d); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{}, nil // no finish reason: the worker infers tool_calls
}

func negInf() float64 { z := 0.0; return -1 / z }

func TestWorkerRefusesWhatItsBackendCannotDo(t *testing.T) {
	tools := []*pb.Tool{{Name: "get_weather"}}
	cases := []struct {
		name     string
		features []string
		edit     func(*pb.QueryRequest)
		code     pb.ErrorCode // 0 = answered
	}{
		// The backend calls a tool the query does not offer: its error,
		// not a tool call a routing node would take for a violation.
		{"plain query, no features", nil, func(*pb.QueryRequest) {}, protocol.CodeBackendError},
		{"tools without the feature", nil, func(r *pb.QueryRequest) { r.Tools = tools }, protocol.CodeUnsupported},
		{"tools with the feature", []string{"tools"}, func(r *pb.QueryRequest) { r.Tools = tools }, 0},
		{"json_schema with only json_object", []string{"json_object"}, func(r *pb.QueryRequest) {
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Schema: "{}"}
		}, protocol.CodeUnsupported},
		{"logprobs without the feature", []string{"tools"}, func(r *pb.QueryRequest) { r.Params = &pb.Params{Logprobs: true} }, protocol.CodeUnsupported},
		{"continuation without the feature", []string{"tools"}, func(r *pb.QueryRequest) { r.Continuation = "x" }, protocol.CodeUnsupported},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := newWorker(t, &toolCaller{features: c.features})
			q := req("weather?")
			c.edit(q)
			var events []*pb.Event
			done, err := w.Serve(context.Background(), q, func(ev *pb.Event) error { events = append(events, ev); return nil })
			if c.code != 0 {
				if pe := protocol.AsError(err); err == nil || pe.Code != c.code {
					t.Fatalf("err = %v, want %v", err, c.code)
				}
				if len(events) != 0 && c.code != protocol.CodeBackendError {
					t.Fatalf("a refused query emitted %v", events)
				}
				for _, ev := range events {
					if ev.GetToolCall() != nil {
						t.Fatalf("a tool call left the worker: %v", ev)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if done.GetFinishReason() != protocol.FinishToolCalls {
				t.Errorf("finish reason %q, want tool_calls", done.GetFinishReason())
			}
			var args strings.Builder
			var lp *pb.TokenLogprob
			for _, ev := range events {
				if err := protocol.ValidateEvent(ev); err != nil {
					t.Fatalf("invalid event %v: %v", ev, err)
				}
				if tc := ev.GetToolCall(); tc != nil {
					args.WriteString(tc.GetArguments())
				}
				if ch := ev.GetChunk(); ch != nil && len(ch.GetLogprobs()) > 0 {
					lp = ch.GetLogprobs()[0]
				}
			}
			if args.String() != `{"city":"Oslo"}` {
				t.Errorf("tool call arguments %q", args.String())
			}
			if lp == nil || lp.GetLogprob() != protocol.MinLogprob {
				t.Errorf("logprob %v, want -Inf clamped to %d", lp, protocol.MinLogprob)
			}
		})
	}
}

// badNameCaller is a fake backend (no model behind it) whose model calls
// a tool by a name no tool may have.
type badNameCaller struct{ toolCaller }

func (f *badNameCaller) Run(_ context.Context, _ *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	return backend.Usage{}, backend.SendToolCall(out, &pb.ToolCallDelta{Id: "c1", Name: "get weather!", Arguments: "{}"})
}

// TestToolCallWithAnInvalidName: a tool call whose name no tool may have
// (the client could not send it back in its next turn) ends the query as
// BACKEND_ERROR, before anything of it is sent.
func TestToolCallWithAnInvalidName(t *testing.T) {
	w := newWorker(t, &badNameCaller{toolCaller{features: []string{"tools"}}})
	q := req("weather?")
	q.Tools = []*pb.Tool{{Name: "get_weather"}}
	var events []*pb.Event
	_, err := w.Serve(context.Background(), q, func(ev *pb.Event) error { events = append(events, ev); return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBackendError || !strings.Contains(pe.Message, "invalid name") {
		t.Fatalf("err %v, want BACKEND_ERROR naming the invalid name", err)
	}
	for _, ev := range events {
		if ev.GetToolCall() != nil {
			t.Fatalf("the invalid call was sent: %v", ev)
		}
	}
}
