package node_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-varint"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// rawClient is a bare libp2p host that speaks the query protocol by hand,
// the way a buggy or hostile client might.
func rawClient(t *testing.T, target *node.Node) (host.Host, peer.ID) {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Connect(ctx, peer.AddrInfo{ID: target.ID(), Addrs: target.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	return h, target.ID()
}

func frame(body []byte) []byte {
	return append(varint.ToUvarint(uint64(len(body))), body...)
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readEnd reads events until the stream ends and returns the final error
// event, or nil if the stream was reset/closed without one.
func readEnd(t *testing.T, s network.Stream) *pb.Error {
	t.Helper()
	_ = s.SetReadDeadline(time.Now().Add(20 * time.Second))
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	for {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				t.Fatal("stream closed without Done or Error")
			}
			return nil
		}
		switch k := ev.GetKind().(type) {
		case *pb.Event_Error:
			return k.Error
		case *pb.Event_Done:
			t.Fatalf("bad input was answered with Done")
		}
	}
}

func TestBadInputGetsTypedErrors(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1))
	w := s.Workers[0]
	qproto := protocol.QueryProtocol(w.SwarmName())
	good := &pb.QueryRequest{Id: router.NewID(), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi"}

	tests := []struct {
		name     string
		send     func(t *testing.T) []byte
		closeW   bool
		wantCode pb.ErrorCode
	}{
		{"oversized frame", func(*testing.T) []byte {
			return varint.ToUvarint(protocol.MaxRequestFrame + 1)
		}, true, protocol.CodeTooLarge},
		{"garbage bytes", func(*testing.T) []byte {
			return frame([]byte{0xff, 0xff, 0xff, 0xff, 0x0f, 0x01})
		}, true, protocol.CodeBadRequest},
		{"wrong message (an Event)", func(t *testing.T) []byte {
			return frame(mustMarshal(t, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "x"}}}))
		}, true, protocol.CodeBadRequest},
		{"invalid field (short id)", func(t *testing.T) []byte {
			r := proto.Clone(good).(*pb.QueryRequest)
			r.Id = []byte{1, 2, 3}
			return frame(mustMarshal(t, r))
		}, true, protocol.CodeBadRequest},
		{"unknown model", func(t *testing.T) []byte {
			r := proto.Clone(good).(*pb.QueryRequest)
			r.Model = "nope"
			return frame(mustMarshal(t, r))
		}, true, protocol.CodeUnsupported},
		{"truncated frame", func(t *testing.T) []byte {
			b := frame(mustMarshal(t, good))
			return b[:len(b)-2]
		}, true, protocol.CodeBadRequest},
		{"deadline in the past", func(t *testing.T) []byte {
			r := proto.Clone(good).(*pb.QueryRequest)
			r.DeadlineUnixMs = time.Now().Add(-time.Minute).UnixMilli()
			return frame(mustMarshal(t, r))
		}, true, protocol.CodeTimeout},
	}
	h, target := rawClient(t, w)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			st, err := h.NewStream(ctx, target, qproto)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if _, err := st.Write(tc.send(t)); err != nil {
				t.Fatal(err)
			}
			if tc.closeW {
				_ = st.CloseWrite()
			}
			e := readEnd(t, st)
			if e == nil || e.GetCode() != tc.wantCode || e.GetMessage() == "" {
				t.Fatalf("got %v, want %s with a message", e, protocol.CodeName(tc.wantCode))
			}
		})
	}

	// The worker still serves a well-formed query after all that.
	text, _, err := ask(context.Background(), w, chat("demo", "still alive"))
	if err != nil || text == "" {
		t.Fatalf("worker broken after bad input: %q %v", text, err)
	}
}

func TestSilentStreamTimesOut(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the request read timeout")
	}
	s := swarmtest.New(t, swarmtest.Workers(1))
	w := s.Workers[0]
	h, target := rawClient(t, w)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := h.NewStream(ctx, target, protocol.QueryProtocol(w.SwarmName()))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// Send nothing. The worker must answer TIMEOUT (or reset) by itself.
	start := time.Now()
	e := readEnd(t, st)
	if e != nil && e.GetCode() != protocol.CodeTimeout {
		t.Fatalf("got %v, want TIMEOUT", e)
	}
	if time.Since(start) > 25*time.Second {
		t.Fatal("silent stream was held far beyond the request timeout")
	}
}

func TestClientResetCancelsBackend(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.DemoDelay(50*time.Millisecond))
	w := s.Workers[0]
	h, target := rawClient(t, w)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := h.NewStream(ctx, target, protocol.QueryProtocol(w.SwarmName()))
	if err != nil {
		t.Fatal(err)
	}
	long := &pb.QueryRequest{Id: router.NewID(), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "many words " + string(repeat("w ", 500))}
	if err := protocol.WriteFrame(st, long); err != nil {
		t.Fatal(err)
	}
	_ = st.CloseWrite()
	fr := protocol.NewFrameReader(st, protocol.MaxEventFrame)
	for {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			t.Fatal(err)
		}
		if ev.GetChunk() != nil {
			break
		}
	}
	if running, _, _, _ := w.Worker().Load(); running != 1 {
		t.Fatalf("running = %d, want 1", running)
	}
	_ = st.Reset()
	waitFor(t, 5*time.Second, func() bool {
		running, _, _, _ := w.Worker().Load()
		return running == 0
	}, "the worker to cancel the query after the client reset")
}

func repeat(s string, n int) []byte {
	out := make([]byte, 0, len(s)*n)
	for i := 0; i < n; i++ {
		out = append(out, s...)
	}
	return out
}
