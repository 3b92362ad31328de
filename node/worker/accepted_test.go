package worker

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestAcceptedDoesNotWaitForOutput: the first Accepted waits for the first
// output only AcceptedHold; a backend slow to start does not hold it back,
// and the client reads it long before the first token.
func TestAcceptedDoesNotWaitForOutput(t *testing.T) {
	const firstToken = 3 * time.Second
	wh, ch := loopbackHost(t), loopbackHost(t)
	w := newWorker(t, backendtest.SlowStart{Backend: demo.New("w", demo.WithDelay(0)), Wait: firstToken})
	wh.SetStreamHandler("/mtor/test/query", w.HandleStream)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := ch.Connect(ctx, wh.Peerstore().PeerInfo(wh.ID())); err != nil {
		t.Fatal(err)
	}
	s, err := ch.NewStream(ctx, wh.ID(), "/mtor/test/query")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	if err := protocol.WriteFrame(s, req("hello")); err != nil {
		t.Fatal(err)
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	var ev pb.Event
	if err := fr.Read(&ev); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if ev.GetAccepted() == nil {
		t.Fatalf("first event %v, want Accepted", &ev)
	}
	// Far below the backend's first token, generous for a loaded machine.
	if took >= firstToken/2 {
		t.Fatalf("Accepted after %s, behind a first token %s away", took, firstToken)
	}
	for ev.GetDone() == nil {
		ev.Reset()
		if err := fr.Read(&ev); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStreamChunksAsServed: over a stream (where the worker reuses one
// chunk event) the client reads the same chunks, in order, as an
// in-process Serve emits.
func TestStreamChunksAsServed(t *testing.T) {
	wh, ch := loopbackHost(t), loopbackHost(t)
	w := newWorker(t, demo.New("w", demo.WithDelay(0)))
	wh.SetStreamHandler("/mtor/test/query", w.HandleStream)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const prompt = "the quick brown fox jumps over the lazy dog, twice: the quick brown fox"
	var want []string
	if _, err := w.Serve(ctx, req(prompt), func(ev *pb.Event) error {
		if c := ev.GetChunk(); c != nil {
			want = append(want, c.GetText())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(want) < 5 {
		t.Fatalf("the demo backend answered %d chunks; the test needs several", len(want))
	}
	if err := ch.Connect(ctx, wh.Peerstore().PeerInfo(wh.ID())); err != nil {
		t.Fatal(err)
	}
	s, err := ch.NewStream(ctx, wh.ID(), "/mtor/test/query")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := protocol.WriteFrame(s, req(prompt)); err != nil {
		t.Fatal(err)
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	var got []string
	for {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			t.Fatal(err)
		}
		if c := ev.GetChunk(); c != nil {
			got = append(got, c.GetText())
		}
		if ev.GetDone() != nil {
			break
		}
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("stream chunks %q, want %q", got, want)
	}
}
