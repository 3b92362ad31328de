package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// benchResult is one row of the benchmark: one path at one concurrency.
type benchResult struct {
	Path        string  `json:"path"` // "in-process" or "swarm"
	Concurrency int     `json:"concurrency"`
	Queries     int     `json:"queries"`
	Errors      int64   `json:"errors"`
	P50Ms       float64 `json:"p50_ms"`
	P99Ms       float64 `json:"p99_ms"`
	QPS         float64 `json:"qps"`
}

func runBench(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "bench", "[--queries N] [--concurrency 1,64] [--json]")
	queries := fs.Int("queries", 2000, "queries per path and concurrency")
	conc := fs.String("concurrency", "1,64", "comma-separated concurrency levels")
	asJSON := fs.Bool("json", false, "print the results as JSON")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if *queries <= 0 {
		return usagef("--queries must be > 0")
	}
	var levels []int
	for _, s := range strings.Split(*conc, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || c <= 0 || c > 1024 {
			return usagef("--concurrency %q: want positive integers up to 1024", *conc)
		}
		levels = append(levels, c)
	}

	results, err := benchSwarm(ctx, *queries, levels)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(results)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PATH\tCONCURRENCY\tQUERIES\tERRORS\tP50\tP99\tQUERIES/S\tP50 RATIO")
	base := map[int]float64{}
	for _, r := range results {
		if r.Path == "in-process" {
			base[r.Concurrency] = r.P50Ms
		}
	}
	for _, r := range results {
		ratio := "-"
		if b := base[r.Concurrency]; b > 0 {
			ratio = fmt.Sprintf("%.0f", r.P50Ms/b)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.4f ms\t%.4f ms\t%.0f\t%s\n", r.Path, r.Concurrency, r.Queries, r.Errors, r.P50Ms, r.P99Ms, r.QPS, ratio)
	}
	return tw.Flush()
}

// benchSwarm starts a worker with the demo backend (no delay) and a client
// node joined to it, both on loopback, and times the same query called on
// the backend in process and sent through the swarm.
func benchSwarm(ctx context.Context, queries int, levels []int) ([]benchResult, error) {
	tmp, err := os.MkdirTemp("", "mtor-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	be := demo.New("bench", demo.WithDelay(0))
	worker, err := node.New(ctx,
		node.WithDataDir(tmp+"/worker"),
		node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
		node.WithMDNS(false),
		node.WithBackends(be),
		node.WithMaxConcurrency(slices.Max(levels)),
		node.WithMaxQueue(slices.Max(levels)),
	)
	if err != nil {
		return nil, fmt.Errorf("worker node: %w", err)
	}
	defer worker.Close()
	client, err := node.New(ctx,
		node.WithDataDir(tmp+"/client"),
		node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
		node.WithMDNS(false),
		node.WithJoin(worker.JoinLine()),
	)
	if err != nil {
		return nil, fmt.Errorf("client node: %w", err)
	}
	defer client.Close()

	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for !hasModel(client.Router().Models(), demo.DefaultModel, pb.QueryType_QUERY_TYPE_CHAT) {
		select {
		case <-waitCtx.Done():
			return nil, fmt.Errorf("the client node did not learn of the worker within a minute")
		case <-time.After(50 * time.Millisecond):
		}
	}

	inProcess := func(ctx context.Context, req *pb.QueryRequest) error {
		_, err := be.Run(ctx, req, discardSink{})
		return err
	}
	viaSwarm := func(ctx context.Context, req *pb.QueryRequest) error {
		_, err := client.Router().Query(ctx, req, func(*pb.Event) error { return nil })
		return err
	}
	var out []benchResult
	for _, c := range levels {
		for _, p := range []struct {
			name string
			call func(context.Context, *pb.QueryRequest) error
		}{{"in-process", inProcess}, {"swarm", viaSwarm}} {
			r, err := benchOne(ctx, p.call, queries, c)
			if err != nil {
				return nil, err
			}
			r.Path = p.name
			out = append(out, r)
		}
	}
	return out, nil
}

func benchOne(ctx context.Context, call func(context.Context, *pb.QueryRequest) error, queries, conc int) (benchResult, error) {
	lat := make([]time.Duration, queries)
	var next, errs atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= queries || ctx.Err() != nil {
					return
				}
				req := benchRequest()
				qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				t0 := time.Now()
				if err := call(qctx, req); err != nil {
					errs.Add(1)
				}
				lat[i] = time.Since(t0)
				cancel()
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := ctx.Err(); err != nil {
		return benchResult{}, err
	}
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	return benchResult{
		Concurrency: conc,
		Queries:     queries,
		Errors:      errs.Load(),
		P50Ms:       ms(lat[len(lat)*50/100]),
		P99Ms:       ms(lat[min(len(lat)-1, len(lat)*99/100)]),
		QPS:         float64(queries) / elapsed.Seconds(),
	}, nil
}

func benchRequest() *pb.QueryRequest {
	id := make([]byte, protocol.IDLen)
	_, _ = rand.Read(id)
	return &pb.QueryRequest{
		Id:             id,
		Type:           pb.QueryType_QUERY_TYPE_CHAT,
		Model:          demo.DefaultModel,
		Prompt:         "benchmark prompt with a few words in it",
		DeadlineUnixMs: time.Now().Add(30 * time.Second).UnixMilli(),
	}
}

// discardSink drops a backend's output, for the in-process baseline.
type discardSink struct{}

func (discardSink) Chunk(string) error             { return nil }
func (discardSink) Media(string, []byte) error     { return nil }
func (discardSink) Embedding(int, []float32) error { return nil }

var _ backend.Sink = discardSink{}
