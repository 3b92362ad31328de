package router

import (
	"context"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// BenchmarkReceiptOverhead measures what receipts cost a query end to end
// over real libp2p streams on loopback: the same demo answer (no delay)
// from a worker that signs, through a router that checks and
// countersigns, against a worker and router without receipts, the two
// alternating query by query in the same run. It reports the ratio of
// their mean latencies.
//
//	go test ./node/router -run '^$' -bench ReceiptOverhead -benchtime 2000x
func BenchmarkReceiptOverhead(b *testing.B) {
	setup := func(receipts bool) *Router {
		wh, rh := benchHost(b), benchHost(b)
		var wopts []worker.Option
		var ropts []Option
		if receipts {
			wopts = append(wopts, worker.WithSigner(wh.Peerstore().PrivKey(wh.ID())))
			ropts = append(ropts, WithReceipts(rh.Peerstore().PrivKey(rh.ID()), func(*pb.Receipt) {}))
		}
		w := worker.New([]backend.Backend{demo.New("bench", demo.WithDelay(0))}, wopts...)
		w.Refresh(context.Background())
		wh.SetStreamHandler(testProto, w.HandleStream)
		if err := rh.Connect(context.Background(), wh.Peerstore().PeerInfo(wh.ID())); err != nil {
			b.Fatal(err)
		}
		return New(rh, testProto, staticTable{cand(string(wh.ID()), 0, 4, 100, 0, demoModel)}, ropts...)
	}
	plain, signed := setup(false), setup(true)
	query := func(r *Router) time.Duration {
		start := time.Now()
		res, err := r.Query(context.Background(), chat("benchmark prompt with a few words in it"), func(*pb.Event) error { return nil })
		if err != nil {
			b.Fatal(err)
		}
		if (r == signed) != (res.Done.GetReceipt().GetRouterSig() != nil) {
			b.Fatal("receipt presence does not match the setup")
		}
		return time.Since(start)
	}
	query(plain) // warm both connections
	query(signed)
	var tPlain, tSigned time.Duration
	b.ResetTimer()
	for range b.N {
		tPlain += query(plain)
		tSigned += query(signed)
	}
	b.ReportMetric(float64(tPlain.Microseconds())/float64(b.N), "plain-µs/q")
	b.ReportMetric(float64(tSigned.Microseconds())/float64(b.N), "receipts-µs/q")
	b.ReportMetric(float64(tSigned)/float64(tPlain), "ratio")
}

func benchHost(b *testing.B) host.Host {
	b.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	return h
}

// BenchmarkSettleParallel is the CPU of settling one answer's receipt
// (check the worker's signature and the figures, countersign, record) on
// a router settling from 64 goroutines at once, as under 64 concurrent
// clients, with the receipts of 8 workers. It reports the process's CPU
// per settle: run it on two commits to compare.
//
//	go test ./node/router -run '^$' -bench SettleParallel -benchtime 20000x -count 3
func BenchmarkSettleParallel(b *testing.B) {
	const goroutines, workers = 64, 8
	rh := benchHost(b)
	r := New(rh, testProto, staticTable{}, WithReceipts(rh.Peerstore().PrivKey(rh.ID()), func(*pb.Receipt) {}))
	type answer struct {
		check *receiptCheck
		p     peer.ID
		req   *pb.QueryRequest
		done  *pb.Done
	}
	keys := make([]crypto.PrivKey, workers)
	for i := range keys {
		var err error
		if keys[i], _, err = crypto.GenerateEd25519Key(nil); err != nil {
			b.Fatal(err)
		}
	}
	answers := make(chan answer, goroutines)
	for i := range goroutines {
		k := keys[i%workers]
		p, err := peer.IDFromPrivateKey(k)
		if err != nil {
			b.Fatal(err)
		}
		req := chat("benchmark prompt")
		req.Id = make([]byte, protocol.IDLen)
		req.Id[0], req.Id[1] = byte(i), 1
		c := r.newReceiptCheck()
		out := receipt.NewOutputHash()
		for range 16 { // 16 tokens an answer, as mtor bench's
			ev := &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "tok "}}}
			c.add(ev)
			out.Add(ev)
		}
		done := &pb.Done{Model: req.GetModel(), Usage: &pb.Usage{PromptTokens: 3, CompletionTokens: 16},
			Timing: &pb.Timing{TtftMs: 1, TotalMs: 2}}
		done.Receipt = receipt.New(req, done, out.Sum(), p, rh.ID(), time.Now())
		if err := receipt.Sign(done.Receipt, k); err != nil {
			b.Fatal(err)
		}
		answers <- answer{c, p, req, done}
	}
	b.SetParallelism((goroutines + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	cpu0 := cpuTime()
	b.ResetTimer()
	b.RunParallel(func(it *testing.PB) {
		a := <-answers // this goroutine's own: settle countersigns in place
		for it.Next() {
			if err := r.settle(a.check, a.p, false, false, a.req, a.done); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(b.N)/1e3, "cpu-µs/settle")
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
