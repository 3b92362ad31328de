package worker

import (
	"context"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// slowStart is the demo backend with a first token that takes a while.
type slowStart struct {
	backend.Backend
	wait time.Duration
}

func (s slowStart) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	select {
	case <-time.After(s.wait):
	case <-ctx.Done():
		return backend.Usage{}, ctx.Err()
	}
	return s.Backend.Run(ctx, req, out)
}

// TestAcceptedDoesNotWaitForOutput: the first Accepted waits for the first
// output only AcceptedHold; a backend slow to start does not hold it back,
// and the client reads it long before the first token.
func TestAcceptedDoesNotWaitForOutput(t *testing.T) {
	const firstToken = 3 * time.Second
	wh, ch := loopbackHost(t), loopbackHost(t)
	w := newWorker(t, slowStart{demo.New("w", demo.WithDelay(0)), firstToken})
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
