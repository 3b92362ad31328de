package router

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol/pb"
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
