package router

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestLargeRequestToAFrozenWorkerMovesOn: a request larger than the
// stream's window, sent to a worker that takes the stream and never reads
// (a stand-in for a process stopped with SIGSTOP), is bounded like the wait
// for Accepted: the query moves to a live worker, on TCP and on QUIC,
// rather than wait out its own deadline in the write.
func TestLargeRequestToAFrozenWorkerMovesOn(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			frozen := testHostOn(t, tc.listen)
			hold := make(chan struct{})
			t.Cleanup(func() { close(hold) })
			frozen.SetStreamHandler(testProto, func(s network.Stream) { <-hold; _ = s.Reset() })
			live := testHostOn(t, tc.listen)
			w := worker.New([]backend.Backend{demo.New("live", demo.WithDelay(0))})
			w.Refresh(t.Context())
			live.SetStreamHandler(testProto, w.HandleStream)
			h := testHostOn(t, tc.listen)
			connect(t, h, frozen, live)
			table := staticTable{
				cand(string(frozen.ID()), 0, 4, 100, 0, demoModel),                  // looks best
				cand(string(live.ID()), 0, 4, 100, 500*time.Millisecond, demoModel), // clearly worse
			}
			r := New(h, testProto, table, WithAcceptTimeout(500*time.Millisecond))
			r.send = time.Second // protocol.RequestTimeout's 10 s, shortened for the test
			// 2 MiB: past yamux's and quic-go's first stream windows.
			q := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: strings.Repeat("x", 2<<20)}
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			start := time.Now()
			var reached time.Duration // to the live worker's first event
			res, err := r.Query(ctx, q, func(*pb.Event) error {
				if reached == 0 {
					reached = time.Since(start)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("after %s: %v", time.Since(start).Round(time.Millisecond), err)
			}
			if res.Peer != live.ID() {
				t.Fatalf("answered by %s, want the live worker", res.Peer)
			}
			// The write's bound: 0.5 s + 1 s per MiB of request.
			if reached > 10*time.Second {
				t.Fatalf("the query took %s to leave the frozen worker", reached.Round(time.Millisecond))
			}
		})
	}
}

// TestPanickingHandlerLeavesNothing: a handler that panics (net/http
// recovers a bridge handler's panic and serves on) leaves no stream open
// to the worker, no query counted in flight there and its connection
// unprotected, and the panic goes on to the caller.
func TestPanickingHandlerLeavesNothing(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) { testPanickingHandlerLeavesNothing(t, tr.listen) })
	}
}

func testPanickingHandlerLeavesNothing(t *testing.T, listen string) {
	live := demoWorkerOn(t, listen, "live", 200*time.Millisecond)
	h := testHost(t)
	connect(t, h, live)
	r := New(h, testProto, staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		// An answer of 20 s: its stream outlives the test unless reset.
		_, _ = r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: strings.Repeat("word ", 100)},
			func(ev *pb.Event) error {
				if ev.GetChunk() != nil {
					panic("handler bug")
				}
				return nil
			})
	}()
	if recovered != "handler bug" {
		t.Fatalf("recovered %v, want the handler's panic", recovered)
	}
	r.mu.Lock()
	inflight := r.peers[live.ID()].inflight
	r.mu.Unlock()
	if inflight != 0 || h.ConnManager().IsProtected(live.ID(), InFlightTag) {
		t.Fatalf("after the panic: %d in flight, protected %v; want none", inflight, h.ConnManager().IsProtected(live.ID(), InFlightTag))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := 0
		for _, c := range h.Network().ConnsToPeer(live.ID()) {
			for _, s := range c.GetStreams() {
				if s.Protocol() == testProto {
					n++
				}
			}
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d query streams still open to the worker", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRequestThatCannotBeEncoded: a request with a string that is not
// UTF-8 (which a protobuf string cannot carry) ends at once as
// BAD_REQUEST, blaming no worker, rather than as a worker that died.
func TestRequestThatCannotBeEncoded(t *testing.T) {
	live := demoWorker(t, "live", 0)
	h := testHost(t)
	connect(t, h, live)
	r := New(h, testProto, staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)})
	q := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "caf\xff"}
	_, err := r.Query(t.Context(), q, func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBadRequest {
		t.Fatalf("err %v, want BAD_REQUEST", err)
	}
}
