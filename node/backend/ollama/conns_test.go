package ollama_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/ollama"
)

// TestFlushedStreamKeepsItsConnection: queries one after another to a
// server that flushes each line and ends its chunked body after the done
// line reuse one connection: the backend reads the body's end after done
// instead of closing the body before it (which closes the connection).
func TestFlushedStreamKeepsItsConnection(t *testing.T) {
	var newConns atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/x-ndjson")
		for _, l := range []string{
			`{"message":{"role":"assistant","content":"a"},"done":false}`,
			`{"message":{"role":"assistant","content":"b"},"done":true,"done_reason":"stop","prompt_eval_count":1,"eval_count":2}`,
		} {
			_, _ = io.WriteString(w, l+"\n")
			w.(http.Flusher).Flush()
		}
		time.Sleep(5 * time.Millisecond) // the body's end comes a moment after done
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			newConns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	b, err := ollama.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 5 {
		var s backendtest.Sink
		if _, err := b.Run(ctx, backendtest.ChatRequest("m", "hi", 4), &s); err != nil || s.Text() != "ab" {
			t.Fatalf("query %d: %q, %v", i, s.Text(), err)
		}
	}
	if n := newConns.Load(); n != 1 {
		t.Fatalf("%d connections opened for 5 queries one after another, want 1", n)
	}
}
