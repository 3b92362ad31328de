package api_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
)

// A query still running when the node's grace runs out ends with an
// UNAVAILABLE error event that says why, not with a connection cut in
// the middle of the stream (which `mtor query` could only report as
// "unexpected EOF"); its worker's query is cancelled.
func TestStopPastTheGraceEndsQueriesWithAnError(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.DemoDelay(200*time.Millisecond))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := api.NewServer(s.Bootstrap, s.Bootstrap.Router())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	c := api.NewClient(ln.Addr().String())

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	streaming := make(chan struct{})
	res := make(chan error, 1)
	go func() {
		var once bool
		_, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Prompt: strings.Repeat("word ", 300)}, func(ev *api.Event) error {
			if ev.Event == api.EventChunk && !once {
				once = true
				close(streaming)
			}
			return nil
		})
		res <- err
	}()
	select {
	case <-streaming:
	case err := <-res:
		t.Fatalf("query ended before streaming: %v", err)
	}

	grace, stop := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer stop()
	start := time.Now()
	if err := srv.Shutdown(grace); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("shutdown past the grace: %v, want the grace's deadline", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("shutdown took %s", took)
	}
	err = <-res
	var pe *protocol.Error
	if !errors.As(err, &pe) || pe.Code != protocol.CodeUnavailable || !strings.Contains(pe.Message, "the node is stopping") {
		t.Fatalf("query cut by the stop: %v, want UNAVAILABLE saying the node is stopping", err)
	}
	if err := <-served; err != nil {
		t.Errorf("serve: %v", err)
	}
	w := s.Workers[0].Worker()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if running, queued, _, _ := w.Load(); running == 0 && queued == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the worker still runs the query cut by the stop")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A node that dies mid-answer (its connection closed without an error
// event) is reported as such, with the node's address, not as a bare
// transport error.
func TestClientReportsAStreamCutOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string // written before the connection is cut
	}{
		{"mid-line", "{\"event\":\"chunk\",\"text\":\"hel"},
		{"between events", "{\"event\":\"chunk\",\"text\":\"hello\"}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/x-ndjson")
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write([]byte(tc.body))
				w.(http.Flusher).Flush()
				// The process dies: the connection closes, the chunked
				// body never ends.
				conn, _, err := http.NewResponseController(w).Hijack()
				if err == nil {
					conn.Close()
				}
			})}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go func() { _ = srv.Serve(ln) }()
			defer srv.Close()
			c := api.NewClient(ln.Addr().String())
			_, err = c.Query(t.Context(), &api.QueryRequest{Model: "demo", Prompt: "hi"}, nil)
			if err == nil || !strings.Contains(err.Error(), "the node at http://"+ln.Addr().String()) || !strings.Contains(err.Error(), "the answer is incomplete") {
				t.Fatalf("err = %v, want the node's address and that the answer is incomplete", err)
			}
		})
	}
}
