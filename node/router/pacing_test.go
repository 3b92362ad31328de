package router

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestPacerBoundsOpensAndQueue(t *testing.T) {
	pc := newPacer(2, 1)
	p := peer.ID("w")
	ctx := t.Context()
	r1, err := pc.acquire(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	r2, err := pc.acquire(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	// A third waits (the queue holds one), a fourth is refused at once.
	got := make(chan func(), 1)
	go func() {
		r, err := pc.acquire(ctx, p)
		if err != nil {
			t.Error(err)
		}
		got <- r
	}()
	waitUntil(t, func() bool { _, w := pc.inflight(p); return w == 1 })
	var full paceFull
	if _, ok := pc.try(p); ok {
		t.Fatal("a turn was free with both taken")
	}
	if _, err := pc.acquire(ctx, p); !errors.As(err, &full) || protocol.AsError(err).Code != protocol.CodeBusy {
		t.Fatalf("acquire past the queue = %v, want paceFull BUSY", err)
	}
	// Another worker has its own gate.
	ro, ok := pc.try(peer.ID("other"))
	if !ok {
		t.Fatal("another worker's turn was not free")
	}
	ro()
	r1()
	r1() // idempotent: gives back one turn, not two
	r3 := <-got
	if opens, waiting := pc.inflight(p); opens != 2 || waiting != 0 {
		t.Fatalf("after a release: %d opens, %d waiting; want 2, 0", opens, waiting)
	}
	// A waiter whose context ends leaves the queue.
	cctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { _, err := pc.acquire(cctx, p); errc <- err }()
	waitUntil(t, func() bool { _, w := pc.inflight(p); return w == 1 })
	cancel()
	if err := <-errc; protocol.AsError(err).Code != protocol.CodeCancelled {
		t.Fatalf("cancelled wait = %v, want CANCELLED", err)
	}
	r2()
	r3()
	pc.mu.Lock()
	n := len(pc.gates)
	pc.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d gates left with nobody using them", n)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10 s")
		}
		time.Sleep(time.Millisecond)
	}
}

// unlimitedHost has no resource limits: this test is about the worker's
// pace of taking streams, not about libp2p's limits.
func unlimitedHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ResourceManager(&network.NullResourceManager{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// A worker that takes new streams one at a time, 40 ms each (as a
// CPU-starved one does under a burst), and a burst of 60 queries from
// one router: paced, each query's wait for Accepted covers only the few
// opens ahead of it and all are answered; opened all at once, the later
// ones wait past the Accepted bound and the live worker is taken for a
// frozen one.
func TestPacedOpensKeepABurstWithinTheAcceptBound(t *testing.T) {
	const (
		burst  = 60
		intake = 40 * time.Millisecond // per stream, one at a time: 2.4 s for the burst
		bound  = time.Second
	)
	for _, tc := range []struct {
		name     string
		opens    int
		wantFail bool
	}{
		{"paced", 4, false}, // at most 4 × 40 ms behind
		{"unpaced", burst, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wh := unlimitedHost(t)
			w := worker.New([]backend.Backend{demo.New("slow-intake", demo.WithDelay(time.Millisecond))},
				worker.WithMaxConcurrency(burst), worker.WithMaxQueue(burst))
			w.Refresh(t.Context())
			var mu sync.Mutex
			var maxWaiting, waiting atomic.Int64
			wh.SetStreamHandler(testProto, func(s network.Stream) {
				n := waiting.Add(1)
				for m := maxWaiting.Load(); n > m && !maxWaiting.CompareAndSwap(m, n); m = maxWaiting.Load() {
				}
				mu.Lock()
				time.Sleep(intake)
				mu.Unlock()
				waiting.Add(-1)
				w.HandleStream(s)
			})
			h := unlimitedHost(t)
			connect(t, h, wh)
			r := New(h, testProto, staticTable{cand(string(wh.ID()), 0, burst, 100, 0, demoModel)},
				WithAcceptTimeout(bound), WithOpenPacing(tc.opens, burst))
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			var wg sync.WaitGroup
			var failed atomic.Int64
			var firstErr atomic.Value
			for range burst {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi",
						Params: &pb.Params{MaxTokens: 4}}, func(*pb.Event) error { return nil })
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					}
				}()
			}
			wg.Wait()
			t.Logf("%s: %d of %d failed (first: %v); at most %d streams waited at the worker's intake", tc.name, failed.Load(), burst, firstErr.Load(), maxWaiting.Load())
			if tc.wantFail != (failed.Load() > 0) {
				t.Fatalf("%s: %d of %d failed", tc.name, failed.Load(), burst)
			}
			if !tc.wantFail && maxWaiting.Load() > int64(tc.opens) {
				t.Fatalf("%d streams waited at the worker at once, over the %d opens allowed", maxWaiting.Load(), tc.opens)
			}
		})
	}
}

// When the worker's resource manager resets a stream at its per-peer
// limit, the query is BUSY and the live worker keeps its health: a
// refusal is not a death.
func TestWorkerStreamLimitIsBusy(t *testing.T) {
	limits := rcmgr.PartialLimitConfig{
		ProtocolPeer: map[libp2pproto.ID]rcmgr.ResourceLimits{testProto: {Streams: 2, StreamsInbound: 2}},
	}.Build(rcmgr.DefaultLimits.AutoScale())
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits))
	if err != nil {
		t.Fatal(err)
	}
	wh, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ResourceManager(rm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wh.Close() })
	// Answers of 20 tokens 50 ms apart hold both streams it allows.
	w := worker.New([]backend.Backend{demo.New("two-streams", demo.WithDelay(50*time.Millisecond))})
	w.Refresh(t.Context())
	wh.SetStreamHandler(testProto, w.HandleStream)
	h := unlimitedHost(t)
	connect(t, h, wh)
	r := New(h, testProto, staticTable{cand(string(wh.ID()), 0, 4, 100, 0, demoModel)})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	const queries = 8
	errs := make(chan error, queries)
	for range queries {
		go func() {
			_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi",
				Params: &pb.Params{MaxTokens: 20}}, func(*pb.Event) error { return nil })
			errs <- err
		}()
	}
	answered, busy := 0, 0
	for range queries {
		err := <-errs
		switch pe := protocol.AsError(err); {
		case err == nil:
			answered++
		case pe.Code == protocol.CodeBusy:
			busy++
		default:
			t.Errorf("error %v, want an answer or BUSY", err)
		}
	}
	t.Logf("%d answered, %d busy", answered, busy)
	if answered == 0 || busy == 0 {
		t.Fatalf("%d answered, %d busy: want both", answered, busy)
	}
	for _, v := range r.Peers() {
		if v.LocalHealth < 100 || v.Breaker != "closed" {
			t.Fatalf("peer %s: health %v, breaker %s, for refusing streams over its limit", v.Peer, v.LocalHealth, v.Breaker)
		}
	}
}

func quicHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/udp/0/quic-v1"), libp2p.ResourceManager(&network.NullResourceManager{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// QUIC lets a peer hold 256 streams per connection (go-libp2p's
// MaxIncomingStreams); past that an open waits for one of them to end.
// Answers that outlast the dial bound: the opens that wait are queued at
// the worker, not failing to reach it, and every query is answered.
func TestQUICStreamCreditWaitIsNotADialFailure(t *testing.T) {
	const queries = 300
	wh := quicHost(t)
	// About 1.5 s per answer: 6 tokens 300 ms apart.
	w := worker.New([]backend.Backend{demo.New("quic", demo.WithDelay(300*time.Millisecond))},
		worker.WithMaxConcurrency(queries), worker.WithMaxQueue(queries))
	w.Refresh(t.Context())
	wh.SetStreamHandler(testProto, w.HandleStream)
	h := quicHost(t)
	connect(t, h, wh)
	r := New(h, testProto, staticTable{cand(string(wh.ID()), 0, queries, 100, 0, demoModel)}, WithDialTimeout(500*time.Millisecond))
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	errs := make(chan error, queries)
	for range queries {
		go func() {
			_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi",
				Params: &pb.Params{MaxTokens: 6}}, func(*pb.Event) error { return nil })
			errs <- err
		}()
	}
	failed := 0
	for range queries {
		if err := <-errs; err != nil {
			if failed++; failed <= 3 {
				t.Errorf("query: %v", err)
			}
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d queries failed", failed, queries)
	}
}

// A burst meets a frozen worker (it takes streams and never answers):
// once the opens ahead have failed and its breaker is open, the queries
// still waiting for a turn move to the live worker at once instead of
// each waiting out the Accepted bound there.
func TestQueriesWaitingForAFrozenWorkerMoveOn(t *testing.T) {
	const (
		burst = 60
		opens = 4
	)
	// fakeFrozenWorker stands in for a worker process stopped with SIGSTOP.
	frozen := unlimitedHost(t)
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	var reached atomic.Int64
	frozen.SetStreamHandler(testProto, func(s network.Stream) { reached.Add(1); <-hold; s.Reset() })
	live := unlimitedHost(t)
	w := worker.New([]backend.Backend{demo.New("live", demo.WithDelay(0))}, worker.WithMaxConcurrency(burst), worker.WithMaxQueue(burst))
	w.Refresh(t.Context())
	live.SetStreamHandler(testProto, w.HandleStream)
	h := unlimitedHost(t)
	connect(t, h, frozen, live)
	table := staticTable{
		cand(string(frozen.ID()), 0, burst, 100, 0, demoModel),                  // looks best
		cand(string(live.ID()), 0, burst, 100, 500*time.Millisecond, demoModel), // clearly worse
	}
	r := New(h, testProto, table, WithAcceptTimeout(500*time.Millisecond), WithOpenPacing(opens, burst))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	errs := make(chan error, burst)
	for range burst {
		go func() {
			_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi"},
				func(*pb.Event) error { return nil })
			errs <- err
		}()
	}
	for range burst {
		if err := <-errs; err != nil {
			t.Errorf("query: %v", err)
		}
	}
	// The first turns (and a half-open trial) reach it; not the queue.
	t.Logf("%d of %d queries opened a stream to the frozen worker", reached.Load(), burst)
	if n := reached.Load(); n > 2*opens+2 {
		t.Fatalf("%d queries reached the frozen worker, want at most %d", n, 2*opens+2)
	}
}
