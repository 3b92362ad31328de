package openai_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/openai"
)

// TestConcurrentQueriesReuseConnections: a worker running many queries at
// once keeps its connections to the server for the next ones (Go's
// default transport keeps 2 idle, which made a busy worker open a
// connection per query).
func TestConcurrentQueriesReuseConnections(t *testing.T) {
	const conc = 32
	var arrived sync.WaitGroup // each round's queries are all open at once
	var newConns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		arrived.Done()
		arrived.Wait()
		_, _ = io.WriteString(w, event("ok", "stop")+"data: [DONE]\n\n")
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			newConns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	b, err := openai.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for round := range 2 {
		arrived.Add(conc)
		var wg sync.WaitGroup
		errs := make(chan error, conc)
		for range conc {
			wg.Go(func() {
				var s backendtest.Sink
				if _, err := b.Run(ctx, backendtest.ChatRequest("m", "hi", 4), &s); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	if n := newConns.Load(); n != conc {
		t.Fatalf("%d connections opened for 2 rounds of %d concurrent queries, want %d (the second round reuses the first's)", n, conc, conc)
	}
}
