package node_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/ollama"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// kinds are the backends that can sit in front of the real engine.
var kinds = []struct {
	name string
	make func(url string) (backend.Backend, error)
}{
	{"openai", func(u string) (backend.Backend, error) { return openai.New(u) }},
	{"ollama", func(u string) (backend.Backend, error) { return ollama.New(u) }},
}

// engineSwarm starts one real llama.cpp engine per worker, each behind a
// backend of the given kind.
func engineSwarm(t *testing.T, kind func(string) (backend.Backend, error), workers int) (*swarmtest.Swarm, []*enginetest.Engine) {
	t.Helper()
	engines := make([]*enginetest.Engine, workers)
	for i := range engines {
		engines[i] = enginetest.Start(t, enginetest.WithSequences(4))
	}
	s := swarmtest.New(t, swarmtest.Workers(workers), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, _ string) []backend.Backend {
			b, err := kind(engines[i].URL())
			if err != nil {
				t.Fatal(err)
			}
			return []backend.Backend{b}
		}))
	return s, engines
}

func engineChat(model string, maxTokens uint32) *pb.QueryRequest {
	r := chat(model, "tell me a story")
	r.Params = &pb.Params{MaxTokens: maxTokens}
	return r
}

func TestRealEngineThroughTheSwarm(t *testing.T) {
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			s, engines := engineSwarm(t, k.make, 1)
			e := engines[0]
			client := s.Clients[0]

			// Model list: the engine's model is known swarm-wide as chat.
			models := client.Router().Models()
			if len(models) != 1 || models[0].Name != e.Model() || !slices.Contains(models[0].Types, "chat") {
				t.Fatalf("models = %+v, want %s with chat", models, e.Model())
			}

			// Streaming: several chunks before Done, usage counted.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			chunks := 0
			res, err := client.Router().Query(ctx, engineChat(e.Model(), 24), func(ev *pb.Event) error {
				if ev.GetChunk() != nil {
					chunks++
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if chunks < 3 || res.Done.GetUsage().GetCompletionTokens() == 0 {
				t.Fatalf("%d chunks, done %v", chunks, res.Done)
			}

			// Concurrency: four at once all complete.
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for i := 0; i < 4; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, _, err := ask(ctx, client, engineChat(e.Model(), 16))
					errs <- err
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Errorf("concurrent query: %v", err)
				}
			}

			// Cancel: a query cancelled after its first token stops the
			// generation in the engine.
			before, err := e.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			qctx, qcancel := context.WithCancel(ctx)
			_, err = client.Router().Query(qctx, engineChat(e.Model(), 4000), func(ev *pb.Event) error {
				if ev.GetChunk() != nil {
					qcancel()
				}
				return nil
			})
			qcancel()
			if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeCancelled {
				t.Fatalf("cancelled query: err = %v, want CANCELLED", err)
			}
			wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
			defer wcancel()
			after, err := e.WaitStat(wctx, "aborted", before.Aborted+1)
			if err != nil || after.Aborted <= before.Aborted {
				t.Fatalf("engine did not abort the generation: %+v (%v)", after, err)
			}
		})
	}
}

func TestEngineKilledMidAnswer(t *testing.T) {
	s, engines := engineSwarm(t, kinds[0].make, 2)
	client := s.Clients[0]
	model := engines[0].Model()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// A long answer is streaming; its engine dies under it.
	var once sync.Once
	var victim string
	res, err := client.Router().Query(ctx, engineChat(model, 4000), func(ev *pb.Event) error {
		if ev.GetChunk() != nil {
			once.Do(func() {
				// Whichever engine is generating, kill it.
				for i, e := range engines {
					if st, err := e.Stats(ctx); err == nil && st.Active > 0 {
						victim = s.Workers[i].ID().String()
						e.Kill()
						return
					}
				}
			})
		}
		return nil
	})
	if err == nil {
		t.Fatalf("query survived its engine's death: %+v", res)
	}
	if pe := protocol.AsError(err); pe.Code != protocol.CodeBackendError {
		t.Fatalf("err = %v, want BACKEND_ERROR", err)
	}
	if victim == "" {
		t.Fatal("could not tell which engine was generating")
	}

	// The next queries fail over to the worker whose engine lives.
	for i := 0; i < 5; i++ {
		_, res, err := ask(ctx, client, engineChat(model, 8))
		if err != nil {
			t.Fatalf("query %d after the engine died: %v", i, err)
		}
		if res.Peer.String() == victim {
			t.Fatalf("query %d answered by the worker with the dead engine", i)
		}
	}
}
