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

// countingServer serves h and counts the connections clients open to it;
// it returns the backend in front of it and a context for the test's
// queries.
func countingServer(t *testing.T, h http.HandlerFunc) (*openai.Backend, *atomic.Int64, context.Context) {
	t.Helper()
	var newConns atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			newConns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	b, err := openai.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return b, &newConns, ctx
}

// TestConcurrentQueriesReuseConnections: a worker running many queries at
// once keeps its connections to the server for the next ones (Go's
// default transport keeps 2 idle, which made a busy worker open a
// connection per query).
func TestConcurrentQueriesReuseConnections(t *testing.T) {
	const conc = 32
	var arrived sync.WaitGroup // each round's queries are all open at once
	b, newConns, ctx := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		arrived.Done()
		arrived.Wait()
		_, _ = io.WriteString(w, event("ok", "stop")+"data: [DONE]\n\n")
	})
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

// TestFlushedStreamKeepsItsConnection: a server that flushes each event
// (as model servers do) sends the end of its chunked body after [DONE];
// the backend reads it, so that one connection serves query after query
// instead of one connection per query.
func TestFlushedStreamKeepsItsConnection(t *testing.T) {
	b, newConns, ctx := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		for _, ev := range []string{event("a", ""), event("b", "stop"), "data: [DONE]\n\n"} {
			_, _ = io.WriteString(w, ev)
			w.(http.Flusher).Flush()
		}
		// The handler's return ends the chunked body: a write of its own,
		// after [DONE], once the handler has taken its time.
		time.Sleep(5 * time.Millisecond)
	})
	for i := range 5 {
		var s backendtest.Sink
		if _, err := b.Run(ctx, backendtest.ChatRequest("m", "hi", 4), &s); err != nil {
			t.Fatalf("query %d: %v", i, err)
		}
		if got := s.Text(); got != "ab" {
			t.Fatalf("query %d: text %q", i, got)
		}
	}
	if n := newConns.Load(); n != 1 {
		t.Fatalf("%d connections opened for 5 queries one after another, want 1", n)
	}
}

// TestStreamHeldOpenAfterDone: a server that keeps the body open after
// [DONE] does not hold the answer: the backend waits for the body's end
// only briefly (httputil's Finish), then gives up the connection.
func TestStreamHeldOpenAfterDone(t *testing.T) {
	release := make(chan struct{})
	b, _, ctx := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, event("a", "stop")+"data: [DONE]\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	start := time.Now()
	var s backendtest.Sink
	if _, err := b.Run(ctx, backendtest.ChatRequest("m", "hi", 4), &s); err != nil || s.Text() != "a" {
		t.Fatalf("answer %q, err %v", s.Text(), err)
	}
	// Generous for a loaded machine; the server would hold it a minute.
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("answer took %s behind a body held open after [DONE]", d)
	}
}
