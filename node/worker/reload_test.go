package worker

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func models(w *Worker) []string {
	var out []string
	for _, c := range w.Capabilities() {
		out = append(out, c.Name)
	}
	slices.Sort(out)
	return out
}

// A reload adds a backend's models at once, takes a removed backend's
// models away from new queries, and lets its query in flight finish.
func TestSetBackendsAddsAndDrains(t *testing.T) {
	ctx := context.Background()
	old := demo.New("w", demo.WithModel("old"), demo.WithDelay(20*time.Millisecond))
	kept := demo.New("w", demo.WithModel("kept"), demo.WithDelay(0))
	w := New([]backend.Backend{old, kept})
	w.Refresh(ctx)
	if got := models(w); !slices.Equal(got, []string{"kept", "old"}) {
		t.Fatalf("models before = %v", got)
	}

	// A long query on the backend about to be removed.
	started := make(chan struct{})
	type result struct {
		done   *pb.Done
		err    error
		chunks int
	}
	res := make(chan result, 1)
	go func() {
		r := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "old", Prompt: "a b c d e f g h i j k l m n o p"}
		var n int
		done, err := w.Serve(ctx, r, func(ev *pb.Event) error {
			if _, ok := ev.GetKind().(*pb.Event_Chunk); ok {
				if n == 0 {
					close(started)
				}
				n++
			}
			return nil
		})
		res <- result{done, err, n}
	}()
	<-started

	added := demo.New("w", demo.WithModel("added"), demo.WithDelay(0))
	removed := w.SetBackends(ctx, []backend.Backend{kept, added})
	if got := models(w); !slices.Equal(got, []string{"added", "kept"}) {
		t.Fatalf("models after = %v", got)
	}
	if len(removed) != 1 || removed[0].Backend != old {
		t.Fatalf("removed = %v", removed)
	}
	if removed[0].InFlight() != 1 {
		t.Fatalf("removed backend in flight = %d, want 1", removed[0].InFlight())
	}
	// New queries for the removed model are refused; the kept and added
	// models answer.
	_, err := w.Serve(ctx, &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "old", Prompt: "x"}, func(*pb.Event) error { return nil })
	if protocol.AsError(err).Code != protocol.CodeUnsupported {
		t.Fatalf("query for removed model: err = %v, want UNSUPPORTED", err)
	}
	for _, m := range []string{"kept", "added"} {
		if _, err := w.Serve(ctx, &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: m, Prompt: "x"}, func(*pb.Event) error { return nil }); err != nil {
			t.Fatalf("query for %s: %v", m, err)
		}
	}
	r := <-res
	if r.err != nil || r.done == nil || r.chunks < 10 {
		t.Fatalf("query in flight on the removed backend: done %v, err %v, %d chunks", r.done, r.err, r.chunks)
	}
	if removed[0].InFlight() != 0 {
		t.Fatalf("removed backend still has %d in flight", removed[0].InFlight())
	}
}
