package worker

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// rawBytes is a fake backend (no model behind it) that passes bytes that
// are not UTF-8 on in every string it can, as a backend written outside
// this tree may: a chunk, a log probability's token, a tool call, and
// then, with fail set, an error message.
type rawBytes struct{ fail bool }

const notUTF8 = "caf\xc3 \xff"

func (f *rawBytes) Kind() string                { return "fake" }
func (f *rawBytes) Name() string                { return "fake raw bytes" }
func (f *rawBytes) Probe(context.Context) error { return nil }
func (f *rawBytes) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: "demo", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Features: []string{protocol.FeatureTools}}}, nil
}
func (f *rawBytes) Run(_ context.Context, _ *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if err := out.Chunk(notUTF8); err != nil {
		return backend.Usage{}, err
	}
	if err := backend.SendLogprobs(out, notUTF8, []*pb.TokenLogprob{{Token: notUTF8, Logprob: -1}}); err != nil {
		return backend.Usage{}, err
	}
	if err := backend.SendToolCall(out, &pb.ToolCallDelta{Id: "call_\xff", Name: "f", Arguments: `{"a":"` + notUTF8 + `"}`}); err != nil {
		return backend.Usage{}, err
	}
	if f.fail {
		return backend.Usage{}, errors.New("model server said " + notUTF8)
	}
	return backend.Usage{}, nil
}

// TestBackendBytesNotUTF8: what a backend sends that is not UTF-8 reaches
// the client with U+FFFD in its place, in events that are whole and
// valid, and the stream ends in a terminal event: a protobuf string cannot
// carry other bytes, and an event that cannot be encoded once cut the
// answer as if the client had gone.
func TestBackendBytesNotUTF8(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail bool
	}{{"answer", false}, {"backend error", true}} {
		for _, tr := range transports {
			t.Run(tc.name+"/"+tr.name, func(t *testing.T) { testBackendBytesNotUTF8(t, tr.listen, tc.fail) })
		}
	}
}

func testBackendBytesNotUTF8(t *testing.T, listen string, fail bool) {
	wh, ch := hostOn(t, listen), loopbackHost(t)
	w := newWorker(t, &rawBytes{fail: fail})
	wh.SetStreamHandler("/mtor/test/query", w.HandleStream)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ch.Connect(ctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
		t.Fatal(err)
	}
	s, err := ch.NewStream(ctx, wh.ID(), "/mtor/test/query")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := protocol.WriteFrame(s, withTools(req("hi"))); err != nil {
		t.Fatal(err)
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	var text, args strings.Builder
	var last *pb.Event
	for last == nil {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			t.Fatalf("read: %v (the stream must end in a terminal event)", err)
		}
		if err := protocol.ValidateEvent(&ev); err != nil {
			t.Fatalf("invalid event %v: %v", &ev, err)
		}
		switch k := ev.GetKind().(type) {
		case *pb.Event_Chunk:
			text.WriteString(k.Chunk.GetText())
			for _, lp := range k.Chunk.GetLogprobs() {
				if !strings.Contains(lp.GetToken(), "\uFFFD") {
					t.Errorf("logprob token %q", lp.GetToken())
				}
			}
		case *pb.Event_ToolCall:
			args.WriteString(k.ToolCall.GetArguments())
		case *pb.Event_Done, *pb.Event_Error:
			last = &ev
		}
	}
	if want := strings.Repeat(strings.ToValidUTF8(notUTF8, "\uFFFD"), 2); text.String() != want {
		t.Errorf("text %q, want %q", text.String(), want)
	}
	if !strings.Contains(args.String(), "caf\uFFFD") {
		t.Errorf("tool call arguments %q", args.String())
	}
	if fail {
		e := last.GetError()
		if e.GetCode() != protocol.CodeBackendError || !strings.Contains(e.GetMessage(), "said caf\uFFFD") {
			t.Fatalf("terminal event %v, want BACKEND_ERROR with the message", last)
		}
	} else if last.GetDone() == nil {
		t.Fatalf("terminal event %v, want Done", last)
	}
}

// withTools offers q a tool, so that a tool call may answer it.
func withTools(q *pb.QueryRequest) *pb.QueryRequest {
	q.Tools = []*pb.Tool{{Name: "f"}}
	return q
}
