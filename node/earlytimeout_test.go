package node_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// gatewayTimeout is a model server behind a gateway whose upstream
// timed out: every chat completion is a 504 at once. It counts them.
func gatewayTimeout(t *testing.T) (url string, hits *atomic.Int64) {
	hits = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/chat/completions" {
			http.NotFound(w, r) // no /v1/models: the model is declared
			return
		}
		hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusGatewayTimeout)
		_, _ = w.Write([]byte(`{"error":{"message":"upstream timed out","type":"timeout"}}`))
	}))
	t.Cleanup(srv.Close)
	return srv.URL, hits
}

// TestOwnWorkerTimingOutEarlyMovesOn: a node's own worker shares its
// clock, so its TIMEOUT long before the query's deadline is its
// backend's own (here a gateway's 504): the query moves on to another
// worker as it does from a remote worker's, or ends UNAVAILABLE naming
// the early timeout, with the backend's words, when there is none. Near the deadline the TIMEOUT
// is the query's own, as before (a guard: it passes without the rule
// too). The rule after output is tested in node/router
// (TestEarlyTimeoutMovesOn, own worker): a model server cannot answer 504
// once it streams, and a stream that stalls is a BACKEND_ERROR, which
// moves on anyway.
func TestOwnWorkerTimingOutEarlyMovesOn(t *testing.T) {
	for _, tc := range []struct {
		name     string
		workers  int
		deadline time.Duration
		code     pb.ErrorCode // 0: answered by the other worker
		message  string
	}{
		{name: "another worker answers", workers: 2, deadline: 30 * time.Second},
		{name: "alone", workers: 1, deadline: 30 * time.Second, code: protocol.CodeUnavailable,
			message: "1 worker timed out long before the deadline (last: backend answered 504: upstream timed out)"},
		{name: "near the deadline: the query's own", workers: 1, deadline: 1500 * time.Millisecond, code: protocol.CodeTimeout,
			message: "upstream timed out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url, hits := gatewayTimeout(t)
			s := swarmtest.New(t, swarmtest.Workers(tc.workers),
				swarmtest.Backends(func(i int, label string) []backend.Backend {
					if i > 0 {
						return []backend.Backend{demo.New(label, demo.WithDelay(0))}
					}
					b, err := openai.New(url, openai.WithModelTypes(map[string][]pb.QueryType{demo.DefaultModel: {pb.QueryType_QUERY_TYPE_CHAT}}))
					if err != nil {
						t.Fatal(err)
					}
					return []backend.Backend{b}
				}))
			own := s.Workers[0]
			// Its router ranks its own worker and the other by their
			// figures: ask until its own was asked once.
			for i := 0; hits.Load() == 0; i++ {
				if i == 20 {
					t.Fatal("20 queries, none to the node's own worker")
				}
				ctx, cancel := context.WithTimeout(context.Background(), tc.deadline)
				p, text, err := chatQuery(ctx, own, demo.DefaultModel, "what is the weather like")
				cancel()
				if tc.code != 0 && hits.Load() > 0 {
					if pe := protocol.AsError(err); pe == nil || pe.Code != tc.code || !strings.Contains(pe.Message, tc.message) {
						t.Fatalf("error %v (text %q), want %s: …%s…", err, text, protocol.CodeName(tc.code), tc.message)
					}
					break
				}
				if tc.workers == 1 {
					t.Fatalf("query %d did not reach the own worker's backend: %v", i, err)
				}
				if err != nil || p != s.Workers[1].ID() || !strings.Contains(text, "weather") {
					t.Fatalf("query %d: answered by %s (own %s) with %q, %v; want the other worker (own worker asked %d times)", i, p, own.ID(), text, err, hits.Load())
				}
			}
			if tc.code == 0 {
				t.Logf("the other worker answered after the node's own timed out (%d asked there)", hits.Load())
			}
		})
	}
}
