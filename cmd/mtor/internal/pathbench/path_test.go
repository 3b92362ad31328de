package pathbench_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/bridge"
	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend/openai"
)

// startSwarmPath starts, in this process, a worker node serving the
// backend through the openai backend and a bridge node joined to it; it
// returns the bridge's base URL once a query through it succeeds.
func startSwarmPath(tb testing.TB, backendURL string) string {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	ob, err := openai.New(backendURL)
	if err != nil {
		tb.Fatal(err)
	}
	w, err := node.New(ctx, node.WithDataDir(tb.TempDir()), node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
		node.WithMDNS(false), node.WithBackends(ob), node.WithMaxConcurrency(256), node.WithMaxQueue(256))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { w.Close() })
	c, err := node.New(ctx, node.WithDataDir(tb.TempDir()), node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
		node.WithMDNS(false), node.WithJoin(w.JoinLine()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	bs, err := bridge.New(c.Router(), bridge.WithQueue(1024), bridge.WithQueuePerClient(1024))
	if err != nil {
		tb.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go func() { _ = bs.Serve(ctx, ln) }()
	url := "http://" + ln.Addr().String()
	cl := pathbench.NewClient(url, pathbench.Model, 1)
	defer cl.Close()
	deadline := time.Now().Add(time.Minute)
	for {
		_, _, err := cl.Query(ctx)
		if err == nil {
			return url
		}
		if time.Now().After(deadline) {
			tb.Fatalf("no answer through the bridge within a minute: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestSwarmPathStreamsWholeAnswers: every answer through bridge → worker
// → backend arrives whole (all tokens, [DONE]), one at a time and many at
// once.
func TestSwarmPathStreamsWholeAnswers(t *testing.T) {
	be, err := pathbench.StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	url := startSwarmPath(t, be.URL())
	for _, tc := range []struct {
		model                 string
		queries, conc, tokens int
	}{
		{pathbench.Model, 50, 1, pathbench.DefaultTokens},
		{pathbench.Model, 200, 16, pathbench.DefaultTokens},
		{pathbench.Model, 20, 4, 1},
		{pathbench.Model, 40, 8, 600},
		{pathbench.SlowModel, 32, 32, pathbench.DefaultTokens},
	} {
		cl := pathbench.NewClient(url, tc.model, tc.conc, pathbench.WithTokens(tc.tokens))
		r := cl.Run(context.Background(), tc.queries, tc.conc)
		cl.Close()
		if r.Errors != 0 || r.Tokens != tc.tokens {
			t.Errorf("%s at %d, %d tokens: %d of %d queries failed (first: %s), answers of %d", tc.model, tc.conc, tc.tokens, r.Errors, tc.queries, r.FirstError, r.Tokens)
		}
		if r.P50 <= 0 || r.TTFTP50 <= 0 || r.TTFTP50 > r.P50 {
			t.Errorf("%s at %d: ttft p50 %s, total p50 %s", tc.model, tc.conc, r.TTFTP50, r.P50)
		}
	}
}

// BenchmarkPath runs streamed queries directly against the backend and
// through bridge → worker, 16 at a time; profile the swarm path with
//
//	go test ./cmd/mtor/internal/pathbench -run '^$' -bench 'Path/swarm' -cpuprofile cpu.out -memprofile mem.out
func BenchmarkPath(b *testing.B) {
	be, err := pathbench.StartBackend()
	if err != nil {
		b.Fatal(err)
	}
	defer be.Close()
	for _, p := range []struct{ name, url string }{
		{"direct", be.URL()},
		{"swarm", startSwarmPath(b, be.URL())},
	} {
		b.Run(p.name, func(b *testing.B) {
			cl := pathbench.NewClient(p.url, pathbench.Model, 16)
			defer cl.Close()
			b.SetParallelism(8) // 16 clients on 2 cores
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, _, err := cl.Query(context.Background()); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "queries/s")
		})
	}
}

// BenchmarkPathSequential runs streamed queries one at a time, answers of
// 1, 16 and 64 tokens, directly against the backend and through bridge →
// worker in this process (no process hand-offs), and reports each row's
// p50; the swarm row's p50 minus direct's is what the path adds without
// waking other processes:
//
//	go test ./cmd/mtor/internal/pathbench -run '^$' -bench PathSequential -benchtime 3000x
func BenchmarkPathSequential(b *testing.B) {
	be, err := pathbench.StartBackend()
	if err != nil {
		b.Fatal(err)
	}
	defer be.Close()
	swarm := startSwarmPath(b, be.URL())
	for _, tokens := range []int{1, 16, 64} {
		for _, p := range []struct{ name, url string }{{"direct", be.URL()}, {"swarm", swarm}} {
			b.Run(fmt.Sprintf("tokens=%d/%s", tokens, p.name), func(b *testing.B) {
				cl := pathbench.NewClient(p.url, pathbench.Model, 1, pathbench.WithTokens(tokens))
				defer cl.Close()
				totals := make([]time.Duration, 0, b.N)
				for range b.N {
					_, total, err := cl.Query(context.Background())
					if err != nil {
						b.Fatal(err)
					}
					totals = append(totals, total)
				}
				slices.Sort(totals)
				b.ReportMetric(float64(totals[len(totals)/2].Microseconds())/1000, "p50-ms")
			})
		}
	}
}
