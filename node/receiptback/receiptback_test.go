package receiptback

import (
	"bytes"
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

const (
	queryProto        = "/mtor/test/query"
	receiptProto      = "/mtor/test/receipt/1.0.0"
	receiptBatchProto = "/mtor/test/receipt/1.1.0"
)

func newHost(t *testing.T) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

type table []router.Candidate

func (t table) Candidates() []router.Candidate { return t }

// pair is a real worker (demo backend, signing, with a ledger and the
// receipt handler) and a real routing node that countersigns and returns
// receipts, connected on loopback.
type pair struct {
	w, r    host.Host
	wled    *ledger.Ledger
	router  *router.Router
	sender  *Sender
	consume []*pb.Receipt
	hold    bool // keep countersigned receipts instead of returning them
	pairOpts
	mu     sync.Mutex
	signed []*pb.Receipt // countersigned by the sender (WithBatches)
}

// pairOpts: later, the router leaves countersigning to the sender
// (router.CountersignLater, WithBatches); old, the worker speaks only
// receipt protocol 1.0.0.
type pairOpts struct{ later, old bool }

func newPair(t *testing.T) *pair { return newPairWith(t, pairOpts{}) }

func newPairWith(t *testing.T, o pairOpts) *pair {
	t.Helper()
	p := &pair{w: newHost(t), r: newHost(t), pairOpts: o}
	var err error
	if p.wled, err = ledger.Open("", p.w.ID()); err != nil {
		t.Fatal(err)
	}
	wk := worker.New([]backend.Backend{demo.New("w", demo.WithDelay(0))},
		worker.WithSigner(p.w.Peerstore().PrivKey(p.w.ID())),
		worker.WithOnServed(func(r *pb.Receipt) { p.wled.Record(ledger.Served, r) }))
	wk.Refresh(context.Background())
	p.w.SetStreamHandler(queryProto, wk.HandleStream)
	take := NewReceiver(p.w.ID(), p.wled.Pending, p.wled.Countersigned).HandleStream
	p.w.SetStreamHandler(receiptProto, take)
	if !o.old {
		p.w.SetStreamHandler(receiptBatchProto, take)
	}
	if err := p.r.Connect(context.Background(), peer.AddrInfo{ID: p.w.ID(), Addrs: p.w.Addrs()}); err != nil {
		t.Fatal(err)
	}
	rkey := p.r.Peerstore().PrivKey(p.r.ID())
	p.sender = NewSender(p.r, receiptProto, WithFlushInterval(50*time.Millisecond), WithRetryFor(time.Second), WithBatches(receiptBatchProto, rkey, func(r *pb.Receipt) {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.signed = append(p.signed, proto.CloneOf(r))
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.sender.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	a := &pb.Announce{Health: 100, Load: &pb.Load{MaxConcurrency: 4},
		Models: []*pb.ModelInfo{{Name: "demo", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}}}}
	p.router = router.New(p.r, queryProto, table{{Peer: p.w.ID(), Announce: a}},
		router.WithReceipts(rkey, func(rc *pb.Receipt) {
			p.consume = append(p.consume, proto.CloneOf(rc))
			if !p.hold {
				p.sender.Add(proto.CloneOf(rc)) // as node does: the Done keeps its own
			}
		}))
	return p
}

func (p *pair) ask(t *testing.T, n int) {
	t.Helper()
	ctx := t.Context()
	if p.later {
		ctx = router.CountersignLater(ctx)
	}
	for range n {
		_, err := p.router.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "settle up"},
			func(*pb.Event) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
	}
}

// runSender runs s until the test ends.
func runSender(t *testing.T, s *Sender) {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countersigned(l *ledger.Ledger) uint64 {
	var n uint64
	for _, e := range l.Snapshot().Peers {
		n += e.ServedCountersigned
	}
	return n
}

// TestReturnsCountersignedReceipts: the worker's ledger ends up with each
// served answer's receipt signed by both nodes.
func TestReturnsCountersignedReceipts(t *testing.T) {
	p := newPair(t)
	p.ask(t, 3)
	waitFor(t, "3 countersigned receipts back at the worker", func() bool { return countersigned(p.wled) == 3 })
	// Counted sent once the worker's close came back, after it took them.
	waitFor(t, "3 receipts counted sent", func() bool { sent, _ := p.sender.Stats(); return sent == 3 })
	for _, rc := range p.wled.Snapshot().Recent {
		var r pb.Receipt
		if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
			t.Fatal(err)
		}
		if err := receipt.Verify(&r); err != nil {
			t.Fatalf("worker's copy of a served receipt: %v", err)
		}
	}
	if sent, dropped := p.sender.Stats(); sent != 3 || dropped != 0 {
		t.Fatalf("sender: %d sent, %d dropped", sent, dropped)
	}
}

// TestForeignReceiptsIgnored: receipts sent by a peer that is not their
// requester, forged ones, repeated ones and oversized batches are not
// taken.
func TestForeignReceiptsIgnored(t *testing.T) {
	p := newPair(t)
	p.ask(t, 1)
	waitFor(t, "the honest receipt back", func() bool { return countersigned(p.wled) == 1 })

	p.hold = true
	p.ask(t, 1)
	honest := proto.CloneOf(p.consume[1])
	forged := proto.CloneOf(honest)
	forged.CompletionTokens++ // neither signature covers this any more
	badSig := proto.CloneOf(honest)
	badSig.RouterSig[0] ^= 1 // the figures the worker signed, a broken countersignature
	badBatch := proto.CloneOf(honest)
	if err := receipt.CountersignBatch([]*pb.Receipt{badBatch, proto.CloneOf(p.consume[0])}, p.r.Peerstore().PrivKey(p.r.ID())); err != nil {
		t.Fatal(err)
	}
	badBatch.RouterBatch.Proof[0][0] ^= 1 // a proof that leads to another root
	tests := []struct {
		name  string
		from  func() host.Host
		batch []*pb.Receipt
	}{
		{"another node returns it", func() host.Host { return newHost(t) }, []*pb.Receipt{honest}},
		{"forged figures", func() host.Host { return p.r }, []*pb.Receipt{forged}},
		{"bad countersignature", func() host.Host { return p.r }, []*pb.Receipt{badSig}},
		{"bad batch proof", func() host.Host { return p.r }, []*pb.Receipt{badBatch}},
		{"the first one again", func() host.Host { return p.r }, []*pb.Receipt{p.consume[0]}},
		{"oversized batch", func() host.Host { return p.r }, func() []*pb.Receipt {
			b := make([]*pb.Receipt, protocol.MaxReceiptBatch+1)
			for i := range b {
				b[i] = honest
			}
			return b
		}()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.from()
			if err := h.Connect(t.Context(), peer.AddrInfo{ID: p.w.ID(), Addrs: p.w.Addrs()}); err != nil {
				t.Fatal(err)
			}
			s := NewSender(h, receiptProto)
			// The worker closes the stream of a batch it read, taken or
			// not, and resets that of an oversized one: the sender, which
			// waits for the close, sees which.
			err := s.send(t.Context(), p.w.ID(), tc.batch)
			if oversized := len(tc.batch) > protocol.MaxReceiptBatch; (err != nil) != oversized {
				t.Fatalf("send of %d receipts: %v", len(tc.batch), err)
			}
			// The worker handles a stream at once; give it the time a
			// loaded machine needs, then check nothing was taken.
			time.Sleep(300 * time.Millisecond)
			if n := countersigned(p.wled); n != 1 {
				t.Fatalf("worker took %d countersigned receipts, want still 1", n)
			}
		})
	}
	// The honest second receipt, from its requester, is still taken.
	p.sender.Add(honest)
	waitFor(t, "the second honest receipt back", func() bool { return countersigned(p.wled) == 2 })
}

// TestMoreWorkersThanStreams: receipts for more workers than the streams
// one flush may open (maxStreams), each worker slow to take its batch,
// all reach their workers in later flushes; none is dropped while fewer
// than maxWaiting wait.
func TestMoreWorkersThanStreams(t *testing.T) {
	r := newHost(t)
	var got atomic.Int64
	var ws []peer.ID
	for range 3 * maxStreams {
		w := newHost(t)
		w.SetStreamHandler(receiptProto, func(s network.Stream) {
			var b pb.ReceiptBatch
			if protocol.NewFrameReader(s, protocol.MaxEventFrame).Read(&b) == nil {
				got.Add(int64(len(b.GetReceipts())))
			}
			time.Sleep(150 * time.Millisecond) // holds its stream a while
			_ = s.Close()
		})
		if err := r.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}); err != nil {
			t.Fatal(err)
		}
		ws = append(ws, w.ID())
	}
	s := NewSender(r, receiptProto, WithFlushInterval(50*time.Millisecond))
	runSender(t, s)
	for _, w := range ws {
		for i := range 3 {
			s.Add(&pb.Receipt{Worker: []byte(w), QueryId: []byte{byte(i)}})
		}
	}
	want := int64(3 * len(ws))
	waitFor(t, "every receipt sent", func() bool { sent, _ := s.Stats(); return int64(sent) == want })
	if _, dropped := s.Stats(); dropped != 0 || got.Load() != want {
		t.Fatalf("%d dropped, %d of %d received", dropped, got.Load(), want)
	}
}

// TestBatchCountersignedReceipts: receipts the router left unsigned
// (router.CountersignLater) are countersigned by the sender, with one
// signature for the batch to a worker that speaks 1.1.0 and one each to
// a worker that speaks only 1.0.0; either worker takes them, and the
// routing node's ledger (signed) gets each once, verified.
func TestBatchCountersignedReceipts(t *testing.T) {
	for _, tc := range []struct {
		name string
		old  bool
	}{{"batch", false}, {"old worker, one by one", true}} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPairWith(t, pairOpts{later: true, old: tc.old})
			p.hold = true
			p.ask(t, 4)
			// The first went to a client: countersigned at once, as
			// the router does for a query not marked later. The
			// sender passes it on as it is, with the other three.
			first := proto.CloneOf(p.consume[0])
			if err := receipt.Countersign(first, p.r.Peerstore().PrivKey(p.r.ID())); err != nil {
				t.Fatal(err)
			}
			p.sender.Add(first)
			for _, rc := range p.consume[1:] {
				if receipt.Countersigned(rc) {
					t.Fatal("the router countersigned a receipt marked for later")
				}
				if err := receipt.VerifyWorker(rc); err != nil {
					t.Fatalf("the worker's receipt: %v", err)
				}
				p.sender.Add(proto.CloneOf(rc))
			}
			waitFor(t, "4 countersigned receipts back at the worker", func() bool { return countersigned(p.wled) == 4 })
			var sigs [][]byte
			for _, rc := range p.wled.Snapshot().Recent {
				var r pb.Receipt
				if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
					t.Fatal(err)
				}
				if err := receipt.Verify(&r); err != nil {
					t.Fatalf("worker's copy of a served receipt: %v", err)
				}
				if bytes.Equal(r.GetQueryId(), first.GetQueryId()) {
					if !bytes.Equal(r.GetRouterSig(), first.GetRouterSig()) || r.GetRouterBatch() != nil {
						t.Fatal("the receipt countersigned at once came back otherwise")
					}
					continue
				}
				if (r.GetRouterBatch() != nil) == tc.old {
					t.Fatalf("countersigned in a batch %v for a worker speaking 1.1.0 %v", r.GetRouterBatch() != nil, !tc.old)
				}
				sigs = append(sigs, cmpOr(r.GetRouterBatch().GetSig(), r.GetRouterSig()))
			}
			if len(sigs) != 3 {
				t.Fatalf("%d receipts countersigned by the sender at the worker, want 3", len(sigs))
			}
			if same := bytes.Equal(sigs[0], sigs[1]) && bytes.Equal(sigs[1], sigs[2]); same == tc.old {
				t.Fatalf("one signature for the three: %v", same)
			}
			p.wantSigned(t, 3)
		})
	}
}

// wantSigned checks that the sender countersigned n receipts for the
// routing node's ledger, each verifying.
func (p *pair) wantSigned(t *testing.T, n int) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.signed) != n {
		t.Fatalf("the router's ledger got %d receipts from the sender, want %d", len(p.signed), n)
	}
	for _, r := range p.signed {
		if err := receipt.Verify(r); err != nil {
			t.Fatalf("the router's copy: %v", err)
		}
	}
}

func cmpOr(a, b []byte) []byte {
	if len(a) > 0 {
		return a
	}
	return b
}

// TestUnsentReceiptsStillCountersigned: receipts for a worker that is gone
// (no stream opens, and it is not back within the sender's RetryFor), and
// those waiting when the sender stops, are countersigned all the same:
// the routing node's ledger has them.
func TestUnsentReceiptsStillCountersigned(t *testing.T) {
	for _, stop := range []bool{false, true} {
		t.Run(map[bool]string{false: "worker gone", true: "sender stopped"}[stop], func(t *testing.T) {
			p := newPairWith(t, pairOpts{later: true})
			p.hold = true
			p.ask(t, 3)
			s := p.sender
			if stop {
				// A sender that never flushes, stopped with receipts
				// waiting, some not yet taken in; then one more comes.
				s = NewSender(p.r, receiptProto, WithFlushInterval(time.Hour), WithBatches(receiptBatchProto, p.r.Peerstore().PrivKey(p.r.ID()), p.sender.signed))
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan struct{})
				go func() { s.Run(ctx); close(done) }()
				for _, rc := range p.consume[:2] {
					s.Add(proto.CloneOf(rc))
				}
				cancel()
				<-done
				s.Add(proto.CloneOf(p.consume[2]))
			} else {
				if err := p.w.Close(); err != nil {
					t.Fatal(err)
				}
				for _, rc := range p.consume {
					s.Add(proto.CloneOf(rc))
				}
				waitFor(t, "3 receipts dropped", func() bool { _, d := s.Stats(); return d == 3 })
			}
			p.wantSigned(t, 3)
		})
	}
}

// TestBatchWaitsForAWorkerBack: receipts for a worker not connected at
// their turn (its network dropped, or it restarts) wait for it, and go
// once it is connected again: its ledger takes them all, countersigned
// as it can check them (one by one for a worker that speaks only 1.0.0).
func TestBatchWaitsForAWorkerBack(t *testing.T) {
	for _, old := range []bool{false, true} {
		t.Run(map[bool]string{false: "1.1.0", true: "1.0.0"}[old], func(t *testing.T) {
			p := newPairWith(t, pairOpts{later: true, old: old})
			p.hold = true
			p.ask(t, 3)
			if err := p.r.Network().ClosePeer(p.w.ID()); err != nil {
				t.Fatal(err)
			}
			for _, rc := range p.consume {
				p.sender.Add(proto.CloneOf(rc))
			}
			time.Sleep(300 * time.Millisecond) // several flushes while it is away
			if sent, dropped := p.sender.Stats(); sent != 0 || dropped != 0 {
				t.Fatalf("while the worker was away: %d sent, %d dropped", sent, dropped)
			}
			if err := p.r.Connect(t.Context(), peer.AddrInfo{ID: p.w.ID(), Addrs: p.w.Addrs()}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "3 countersigned receipts back once the worker is", func() bool { return countersigned(p.wled) == 3 })
			// Counted sent once the worker's close came back, after it took them.
			waitFor(t, "3 receipts counted sent", func() bool { sent, _ := p.sender.Stats(); return sent == 3 })
			if sent, dropped := p.sender.Stats(); sent != 3 || dropped != 0 {
				t.Fatalf("sender: %d sent, %d dropped", sent, dropped)
			}
			for _, rc := range p.wled.Snapshot().Recent {
				var r pb.Receipt
				if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
					t.Fatal(err)
				}
				if (r.GetRouterBatch() != nil) == old {
					t.Fatalf("countersigned in a batch %v for a worker speaking 1.1.0 %v", r.GetRouterBatch() != nil, !old)
				}
			}
			p.wantSigned(t, 3)
		})
	}
}

// TestFailedBatchTriedAgain: a worker that reads a batch and resets the
// stream instead of taking it (a limit hit, a connection replaced) gets
// the batch again after a backoff, and takes it then; one that always
// does gets a bounded number of tries, each later than the last, until
// the sender's RetryFor has passed, and the receipts are counted dropped.
func TestFailedBatchTriedAgain(t *testing.T) {
	for _, tc := range []struct {
		name   string
		resets int64 // streams the worker reads and resets before taking any
		later  bool
	}{
		{"one reset, countersigned at once", 1, false},
		{"one reset, countersigned in a batch", 1, true},
		{"always reset", 1 << 30, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPairWith(t, pairOpts{later: tc.later})
			take := NewReceiver(p.w.ID(), p.wled.Pending, p.wled.Countersigned).HandleStream
			var streams, refused atomic.Int64 // streams; receipts in those reset
			p.w.SetStreamHandler(receiptBatchProto, func(s network.Stream) {
				if streams.Add(1) <= tc.resets {
					var b pb.ReceiptBatch
					_ = protocol.NewFrameReader(s, protocol.MaxReceiptFrame).Read(&b)
					refused.Add(int64(len(b.GetReceipts())))
					_ = s.Reset()
					return
				}
				take(s)
			})
			// The three receipts go as one batch: asked with the sender
			// held, then handed to it together.
			p.hold = true
			p.ask(t, 3)
			start := time.Now()
			for _, rc := range p.consume {
				p.sender.Add(proto.CloneOf(rc))
			}
			if tc.resets == 1 {
				waitFor(t, "3 countersigned receipts back after a reset", func() bool { return countersigned(p.wled) == 3 })
				waitFor(t, "3 receipts counted sent", func() bool { sent, _ := p.sender.Stats(); return sent == 3 })
				if sent, dropped := p.sender.Stats(); sent != 3 || dropped != 0 || streams.Load() < 2 || refused.Load() == 0 || p.sender.Retried() == 0 {
					t.Fatalf("sender: %d sent, %d dropped, in %d streams (%d receipts refused)", sent, dropped, streams.Load(), refused.Load())
				}
				return
			}
			waitFor(t, "3 receipts dropped after the tries", func() bool { _, d := p.sender.Stats(); return d == 3 })
			took := time.Since(start)
			time.Sleep(300 * time.Millisecond) // no other try comes
			// RetryFor is 1 s and the flush 50 ms: tries about 50, 100,
			// 200, 400 and 800 ms apart, then one past the second.
			n := streams.Load()
			if sent, _ := p.sender.Stats(); sent != 0 || refused.Load() != 3*n || countersigned(p.wled) != 0 {
				t.Fatalf("sender: %d sent; the worker refused %d receipts in %d streams (want 3 each) and took %d",
					sent, refused.Load(), n, countersigned(p.wled))
			}
			if n < 4 || n > 8 || took < time.Second || p.sender.Retried() != uint64(n-1) {
				t.Fatalf("%d tries in %s (%d counted later tries): want 4 to 8 within the sender's RetryFor of 1 s and one past it",
					n, took.Round(time.Millisecond), p.sender.Retried())
			}
			p.mu.Lock()
			defer p.mu.Unlock()
			if len(p.signed) != 3 { // the ledger has them all the same
				t.Fatalf("%d receipts countersigned for the ledger, want 3", len(p.signed))
			}
		})
	}
}

// TestBatchOutlastsADarkLink: a worker whose connection stays up but
// which takes no batch for several stream timeouts (its link dark, its
// process paused) gets the batch once it takes streams again, within the
// sender's RetryFor: before, a batch had two tries and was dropped.
func TestBatchOutlastsADarkLink(t *testing.T) {
	p := newPairWith(t, pairOpts{later: true})
	take := NewReceiver(p.w.ID(), p.wled.Pending, p.wled.Countersigned).HandleStream
	var dark atomic.Bool
	var unanswered atomic.Int64
	dark.Store(true)
	p.w.SetStreamHandler(receiptBatchProto, func(s network.Stream) {
		if dark.Load() {
			unanswered.Add(1)
			_, _ = io.Copy(io.Discard, s) // read, never closed: the sender's timeout ends it
			return
		}
		take(s)
	})
	s := NewSender(p.r, receiptProto, WithFlushInterval(50*time.Millisecond), WithStreamTimeout(200*time.Millisecond),
		WithRetryFor(3*time.Second), WithBatches(receiptBatchProto, p.r.Peerstore().PrivKey(p.r.ID()), nil))
	runSender(t, s)
	p.hold = true
	p.ask(t, 3)
	for _, rc := range p.consume {
		s.Add(proto.CloneOf(rc))
	}
	waitFor(t, "three streams let time out", func() bool { return unanswered.Load() >= 3 })
	if sent, dropped := s.Stats(); sent != 0 || dropped != 0 {
		t.Fatalf("while the link was dark: %d sent, %d dropped", sent, dropped)
	}
	dark.Store(false)
	waitFor(t, "3 countersigned receipts back once the link is", func() bool { return countersigned(p.wled) == 3 })
	waitFor(t, "3 receipts counted sent", func() bool { sent, _ := s.Stats(); return sent == 3 })
	if sent, dropped := s.Stats(); sent != 3 || dropped != 0 || s.Retried() < 3 {
		t.Fatalf("sender: %d sent, %d dropped, %d later tries", sent, dropped, s.Retried())
	}
}

// TestRetriesKeepTheOldestBound: receipts for a worker that resets
// every stream, coming one after the other, wait together for other
// tries; the newer ones do not keep the oldest waiting past its bound
// (RetryFor after its first failure): the first are dropped within a
// second or two, not kept for as long as new ones come.
func TestRetriesKeepTheOldestBound(t *testing.T) {
	r, w := newHost(t), newHost(t)
	w.SetStreamHandler(receiptBatchProto, func(s network.Stream) {
		var b pb.ReceiptBatch
		_ = protocol.NewFrameReader(s, protocol.MaxReceiptFrame).Read(&b)
		_ = s.Reset()
	})
	if err := r.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}); err != nil {
		t.Fatal(err)
	}
	s := NewSender(r, receiptBatchProto, WithFlushInterval(20*time.Millisecond), WithStreamTimeout(300*time.Millisecond), WithRetryFor(500*time.Millisecond))
	runSender(t, s)
	start := time.Now()
	var firstDropped time.Duration
	for i := 0; time.Since(start) < 4*time.Second; i++ {
		s.Add(&pb.Receipt{Worker: []byte(w.ID()), QueryId: []byte{byte(i)}})
		time.Sleep(100 * time.Millisecond)
		if _, dropped := s.Stats(); dropped > 0 && firstDropped == 0 {
			firstDropped = time.Since(start)
		}
	}
	// The first receipt fails at once, is tried about 6 times in its
	// 0.5 s, and once more at the backoff's next end (at most 0.3 s).
	if firstDropped == 0 || firstDropped > 2*time.Second {
		t.Fatalf("the first receipts dropped %s after the first was added (0: none in 4 s), want within 2 s: newer ones kept them waiting", firstDropped)
	}
}

// TestFullBatchGoesAtOnce: MaxReceiptBatch receipts for one worker go
// in one stream at once, without waiting for the flush, and no empty
// batch follows.
func TestFullBatchGoesAtOnce(t *testing.T) {
	r, w := newHost(t), newHost(t)
	var mu sync.Mutex
	var sizes []int
	w.SetStreamHandler(receiptBatchProto, func(s network.Stream) {
		var b pb.ReceiptBatch
		_ = protocol.NewFrameReader(s, protocol.MaxReceiptFrame).Read(&b)
		mu.Lock()
		sizes = append(sizes, len(b.GetReceipts()))
		mu.Unlock()
		_ = s.Close()
	})
	if err := r.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}); err != nil {
		t.Fatal(err)
	}
	s := NewSender(r, receiptBatchProto, WithFlushInterval(time.Hour))
	runSender(t, s)
	for i := range protocol.MaxReceiptBatch {
		s.Add(&pb.Receipt{Worker: []byte(w.ID()), QueryId: []byte{byte(i)}})
	}
	waitFor(t, "the full batch taken", func() bool { sent, _ := s.Stats(); return sent == protocol.MaxReceiptBatch })
	// A flush now would send what is left for the worker: nothing.
	s2 := NewSender(r, receiptBatchProto, WithFlushInterval(20*time.Millisecond))
	runSender(t, s2)
	for i := range protocol.MaxReceiptBatch {
		s2.Add(&pb.Receipt{Worker: []byte(w.ID()), QueryId: []byte{byte(i)}})
	}
	waitFor(t, "the second full batch taken", func() bool { sent, _ := s2.Stats(); return sent == protocol.MaxReceiptBatch })
	time.Sleep(200 * time.Millisecond) // ten flushes
	mu.Lock()
	defer mu.Unlock()
	if len(sizes) != 2 || sizes[0] != protocol.MaxReceiptBatch || sizes[1] != protocol.MaxReceiptBatch {
		t.Fatalf("batches of %v receipts, want two of %d", sizes, protocol.MaxReceiptBatch)
	}
}

// TestOneLaterTryAtATime: a worker gone dark (its streams never
// closed) with more receipts than one batch holds has them tried again
// one batch at a time: its later tries hold one stream, not all of them.
func TestOneLaterTryAtATime(t *testing.T) {
	r, w := newHost(t), newHost(t)
	var open, most, streams, begun atomic.Int64
	begun.Store(time.Now().UnixNano())
	w.SetStreamHandler(receiptBatchProto, func(s network.Stream) {
		streams.Add(1)
		n := open.Add(1)
		defer open.Add(-1)
		if time.Since(time.Unix(0, begun.Load())) > 400*time.Millisecond { // past the first tries
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
		}
		// Read, never closed: the sender's timeout (200 ms) ends it;
		// counted open for most of that.
		_, _ = io.Copy(io.Discard, s)
		time.Sleep(150 * time.Millisecond)
	})
	if err := r.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}); err != nil {
		t.Fatal(err)
	}
	s := NewSender(r, receiptBatchProto, WithFlushInterval(20*time.Millisecond), WithStreamTimeout(200*time.Millisecond), WithRetryFor(5*time.Second))
	runSender(t, s)
	begun.Store(time.Now().UnixNano())
	for i := range 3 * protocol.MaxReceiptBatch {
		s.Add(&pb.Receipt{Worker: []byte(w.ID()), QueryId: []byte{byte(i), byte(i >> 8)}})
	}
	time.Sleep(2 * time.Second)
	if m := most.Load(); m != 1 || streams.Load() < 6 {
		t.Fatalf("at most %d streams open at once to the dark worker during its later tries (%d in all), want 1", m, streams.Load())
	}
}

// TestWhenTriedAgain: a batch is not tried again when the worker refuses
// the protocol, at once or on a stream opened on what its protocols
// promised (lazily): the batch is dropped after one stream. One the
// worker lets time out (a process paused, a laptop asleep for a moment)
// is tried again until the sender's RetryFor, then dropped. A worker
// that closes the stream takes it.
func TestWhenTriedAgain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler network.StreamHandler // on the batch protocol; nil: none
		promise bool                  // the sender's peerstore says the worker speaks it
		sent    bool
		again   bool // tried again
	}{
		{"refused", nil, false, false, false},
		{"refused after a lazy open", nil, true, false, false},
		{"never closed", func(s network.Stream) { _, _ = io.Copy(io.Discard, s) }, false, false, true},
		{"taken", func(s network.Stream) { _, _ = io.Copy(io.Discard, s); _ = s.Close() }, false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, w := newHost(t), newHost(t)
			if tc.handler != nil {
				w.SetStreamHandler(receiptBatchProto, tc.handler)
			}
			if err := r.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}); err != nil {
				t.Fatal(err)
			}
			if tc.promise {
				if err := r.Peerstore().AddProtocols(w.ID(), receiptBatchProto); err != nil {
					t.Fatal(err)
				}
			}
			s := NewSender(r, receiptBatchProto, WithFlushInterval(20*time.Millisecond), WithStreamTimeout(300*time.Millisecond), WithRetryFor(time.Second))
			runSender(t, s)
			s.Add(&pb.Receipt{Worker: []byte(w.ID()), QueryId: []byte{1}})
			waitFor(t, "the receipt sent or dropped", func() bool { sent, dropped := s.Stats(); return sent+dropped == 1 })
			retried := s.Retried()
			time.Sleep(200 * time.Millisecond) // another try would come within a few flushes
			if sent, dropped := s.Stats(); (sent == 1) != tc.sent || sent+dropped != 1 || (retried > 0) != tc.again || s.Retried() != retried {
				t.Fatalf("sent %d, dropped %d, %d later tries (then %d), want later tries %v", sent, dropped, retried, s.Retried(), tc.again)
			}
		})
	}
}
