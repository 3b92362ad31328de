package ws_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestCloseEndsEachQueryWithAnError: Close (the grace ran out) ends a
// running query and one waiting for the connection's slot each with
// exactly one UNAVAILABLE error, then closes with 1001.
func TestCloseEndsEachQueryWithAnError(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("slow", demo.WithDelay(50*time.Millisecond))))
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, sw, ws.WithMaxQueries(1))
	c := h.mustDial()
	c.hello()
	long := strings.Repeat("word ", 400)
	for _, id := range []string{"q1", "q2"} {
		c.send(msg{"type": "submit_query", "query_id": id, "query": msg{"prompt": long, "query_type": "chat", "model_name": "demo"}})
	}
	// Both accepted (q2 waits for the slot), q1 under way.
	started := map[string]bool{}
	for !started["q1"] || !started["q2"] {
		m, _ := c.until("query_started")
		started[m.str("query_id")] = true
	}
	c.until("query_chunk")
	_ = h.srv.Close()
	ends := map[string][]string{}
	for {
		m, err := c.read()
		if err != nil {
			if st := websocket.CloseStatus(err); st != websocket.StatusGoingAway {
				t.Errorf("the connection ended with %v, want 1001", err)
			}
			break
		}
		switch m.str("type") {
		case "error", "query_result":
			ends[m.str("query_id")] = append(ends[m.str("query_id")], m.str("type")+" "+m.str("code"))
		}
	}
	for _, id := range []string{"q1", "q2"} {
		if got := ends[id]; len(got) != 1 || got[0] != "error UNAVAILABLE" {
			t.Errorf("%s ended with %v, want one UNAVAILABLE error", id, got)
		}
	}
}

// floodSwarm answers with 64 KiB chunks until its query is cancelled.
type floodSwarm struct{ running, chunks atomic.Int64 }

func (f *floodSwarm) Query(ctx context.Context, _ *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	f.running.Add(1)
	defer f.running.Add(-1)
	big := strings.Repeat("x", 64<<10)
	for ctx.Err() == nil {
		f.chunks.Add(1)
		if err := h(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: big}}}); err != nil {
			return nil, err
		}
	}
	return nil, ctx.Err()
}
func (f *floodSwarm) Peers() []router.PeerView { return nil }
func (f *floodSwarm) Models() []router.ModelView {
	return []router.ModelView{{Name: "demo", Types: []string{"chat"}, Peers: 1}}
}

// TestCloseWithAStalledClient: a client that stopped reading, its queue
// and socket full and a query blocked sending to it, does not hold Close
// (its wait for the query's error is bounded); the query is cancelled
// and the connection closed.
func TestCloseWithAStalledClient(t *testing.T) {
	sw := &floodSwarm{}
	h := newHarnessOn(t, sw, ws.WithSendBuffer(8), ws.WithWriteTimeout(time.Minute))
	c := h.mustDial()
	c.send(submit("hi", "chat", "demo"))
	deadline := time.Now().Add(waitLimit)
	for sw.chunks.Load() < 4 { // the query is under way, the client not reading
		if time.Now().After(deadline) {
			t.Fatal("the query never reached the swarm")
		}
		time.Sleep(10 * time.Millisecond)
	}
	closed := make(chan struct{})
	go func() {
		_ = h.srv.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(waitLimit):
		t.Fatal("Close hung on a client that does not read")
	}
	for sw.running.Load() != 0 || h.srv.Connections() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after Close: %d queries running, %d connections open; want none", sw.running.Load(), h.srv.Connections())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
