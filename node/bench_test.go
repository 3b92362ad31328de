package node_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type discard struct{}

func (discard) Chunk(string) error             { return nil }
func (discard) Media(string, []byte) error     { return nil }
func (discard) Embedding(int, []float32) error { return nil }

// BenchmarkQuery compares a query answered by a remote worker through the
// swarm with the same demo backend (no delay) called in-process, at
// concurrency 1 and 64. It reports p50/p99 latency besides ns/op.
//
//	go test ./node -run '^$' -bench BenchmarkQuery -benchtime 2000x
func BenchmarkQuery(b *testing.B) {
	// Admission wide enough for 64 at once: this measures the path, not the
	// worker's queue.
	s := swarmtest.New(b, swarmtest.Workers(1), swarmtest.Clients(1), swarmtest.DemoDelay(0),
		swarmtest.NodeOptions(node.WithMaxConcurrency(64), node.WithMaxQueue(256)))
	be := demo.New("bench", demo.WithDelay(0))
	client := s.Clients[0]
	paths := []struct {
		name string
		call func(ctx context.Context, req *pb.QueryRequest) error
	}{
		{"inprocess", func(ctx context.Context, req *pb.QueryRequest) error {
			_, err := be.Run(ctx, req, discard{})
			return err
		}},
		{"swarm", func(ctx context.Context, req *pb.QueryRequest) error {
			_, err := client.Router().Query(ctx, req, func(*pb.Event) error { return nil })
			return err
		}},
	}
	for _, conc := range []int{1, 64} {
		for _, p := range paths {
			b.Run(fmt.Sprintf("%s/conc=%d", p.name, conc), func(b *testing.B) {
				benchConc(b, conc, p.call)
			})
		}
	}
}

var _ backend.Sink = discard{}

func benchConc(b *testing.B, conc int, call func(context.Context, *pb.QueryRequest) error) {
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Int64
	b.ResetTimer()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				req := &pb.QueryRequest{Id: router.NewID(), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo",
					Prompt: "benchmark prompt with a few words in it"}
				start := time.Now()
				if err := call(context.Background(), req); err != nil {
					failed.Add(1)
				}
				lat[i] = time.Since(start)
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if failed.Load() > 0 {
		b.Fatalf("%d queries failed", failed.Load())
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
}
