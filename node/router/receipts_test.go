package router

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// signingWorker is a real worker with the demo backend that signs
// receipts with its host's key and records what it served in a ledger.
// tamper, when set, changes the events on their way to the wire, as a
// dishonest worker process would.
func signingWorker(t *testing.T, tamper func(*pb.Event)) (host.Host, *ledger.Ledger) {
	t.Helper()
	h := testHost(t)
	led, err := ledger.Open("", h.ID())
	if err != nil {
		t.Fatal(err)
	}
	w := worker.New([]backend.Backend{demo.New("signer", demo.WithDelay(0))},
		worker.WithSigner(h.Peerstore().PrivKey(h.ID())),
		worker.WithOnServed(func(r *pb.Receipt) { led.Record(ledger.Served, r) }))
	w.Refresh(context.Background())
	if tamper == nil {
		h.SetStreamHandler(testProto, w.HandleStream)
		return h, led
	}
	h.SetStreamHandler(testProto, func(s network.Stream) {
		defer s.Close()
		var req pb.QueryRequest
		if err := protocol.NewFrameReader(s, protocol.MaxRequestFrame).Read(&req); err != nil {
			s.Reset()
			return
		}
		write := func(ev *pb.Event) error { tamper(ev); return protocol.WriteFrame(s, ev) }
		done, err := w.ServeFor(context.Background(), s.Conn().RemotePeer(), &req, write)
		if err != nil {
			s.Reset()
			return
		}
		_ = write(&pb.Event{Kind: &pb.Event_Done{Done: done}})
	})
	return h, led
}

func receiptRouter(t *testing.T, workers ...host.Host) (*Router, *ledger.Ledger) {
	t.Helper()
	h := testHost(t)
	connect(t, h, workers...)
	var table staticTable
	for _, w := range workers {
		table = append(table, cand(string(w.ID()), 0, 4, 100, 0, demoModel))
	}
	led, err := ledger.Open("", h.ID())
	if err != nil {
		t.Fatal(err)
	}
	r := New(h, testProto, table, WithHealthOptions(health.WithThreshold(2)),
		WithReceipts(h.Peerstore().PrivKey(h.ID()), func(rc *pb.Receipt) { led.Record(ledger.Consumed, rc) }))
	return r, led
}

func chat(prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: prompt}
}

// TestReceiptCountersignedAndRecorded: an honest worker's receipt comes
// back with both signatures, and both nodes' ledgers record the answer.
func TestReceiptCountersignedAndRecorded(t *testing.T) {
	wh, wled := signingWorker(t, nil)
	r, rled := receiptRouter(t, wh)
	res, err := r.Query(t.Context(), chat("one two three four"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	rc := res.Done.GetReceipt()
	if err := receipt.Verify(rc); err != nil {
		t.Fatalf("receipt of an honest answer: %v", err)
	}
	if peer.ID(rc.GetWorker()) != wh.ID() || peer.ID(rc.GetRequester()) != r.h.ID() {
		t.Fatalf("receipt names worker %s requester %s", peer.ID(rc.GetWorker()), peer.ID(rc.GetRequester()))
	}
	if rc.GetCompletionTokens() != res.Done.GetUsage().GetCompletionTokens() || rc.GetCompletionTokens() == 0 {
		t.Fatalf("receipt tokens %d, done %d", rc.GetCompletionTokens(), res.Done.GetUsage().GetCompletionTokens())
	}
	cons := rled.Snapshot()
	if len(cons.Peers) != 1 || cons.Peers[0].Peer != wh.ID().String() || cons.Total.Consumed.Queries != 1 ||
		cons.Total.Consumed.CompletionTokens != uint64(rc.GetCompletionTokens()) {
		t.Fatalf("router's ledger: %+v", cons)
	}
	// The worker records once its Done is written, which the router may
	// read first.
	waitFor(t, func() bool { return wled.Snapshot().Total.Served.Queries == 1 })
	if got := wled.Balance(r.h.ID()); got != -int64(rc.GetTotalMs()) {
		t.Fatalf("worker's balance of the router = %d, want -%d", got, rc.GetTotalMs())
	}
}

// TestTamperedReceiptRefused: a receipt whose signature or output hash
// does not match what the router received is refused: the answer still
// arrives, without a receipt; nothing is recorded; the worker's breaker
// counts protocol violations until it opens.
func TestTamperedReceiptRefused(t *testing.T) {
	tests := []struct {
		name   string
		tamper func(*pb.Event)
	}{
		{"inflated tokens", func(ev *pb.Event) {
			if d := ev.GetDone(); d != nil {
				d.Usage.CompletionTokens += 100
				d.Receipt.CompletionTokens += 100
			}
		}},
		{"output changed after signing", func(ev *pb.Event) {
			if c := ev.GetChunk(); c != nil {
				c.Text = "x" + c.Text
			}
		}},
		{"receipt for another requester", func(ev *pb.Event) {
			if d := ev.GetDone(); d != nil {
				d.Receipt.Requester = d.Receipt.Worker
			}
		}},
		{"countersigned by the worker", func(ev *pb.Event) {
			if d := ev.GetDone(); d != nil {
				d.Receipt.RouterSig = make([]byte, 64)
			}
		}},
		{"batch-countersigned by the worker", func(ev *pb.Event) {
			if d := ev.GetDone(); d != nil {
				d.Receipt.RouterBatch = &pb.BatchSignature{Size: 1, Sig: make([]byte, 64)}
			}
		}},
	}
	for _, tc := range tests {
		for _, later := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/later=%v", tc.name, later), func(t *testing.T) { tamperedReceipt(t, tc.tamper, later) })
		}
	}
}

// tamperedReceipt is a case of TestTamperedReceiptRefused; later, the
// query is marked CountersignLater, which checks the receipt all the same.
func tamperedReceipt(t *testing.T, tamper func(*pb.Event), later bool) {
	ctx := t.Context()
	if later {
		ctx = CountersignLater(ctx)
	}
	wh, _ := signingWorker(t, tamper)
	r, rled := receiptRouter(t, wh)
	res, err := r.Query(ctx, chat("one two"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if res.Done.GetReceipt() != nil {
		t.Fatal("a tampered receipt was passed on")
	}
	if s := rled.Snapshot(); len(s.Peers) != 0 {
		t.Fatalf("a tampered receipt was recorded: %+v", s.Peers)
	}
	r.mu.Lock()
	score := r.state(wh.ID()).tracker.Score()
	r.mu.Unlock()
	if score >= 100 {
		t.Fatalf("worker health %.0f after a refused receipt, want a violation counted", score)
	}
	// A second violation opens the breaker (threshold 2): the
	// worker gets no more queries.
	_, _ = r.Query(ctx, chat("again"), func(*pb.Event) error { return nil })
	if _, err := r.Query(ctx, chat("third"), func(*pb.Event) error { return nil }); err == nil {
		t.Fatal("a worker with two refused receipts still gets queries")
	}
}

// TestCountersignLater: a query marked CountersignLater gets its checked
// receipt in Done, and the callback too, without the countersignature
// (receiptback adds it in a batch); the ledger is the callback's to fill.
func TestCountersignLater(t *testing.T) {
	// A newer worker's fields, which no signature covers, are dropped.
	wh, _ := signingWorker(t, func(ev *pb.Event) {
		if d := ev.GetDone(); d != nil {
			d.Receipt.ProtoReflect().SetUnknown([]byte{0xfa, 0x07, 0x01, 0x00}) // field 127, 1 byte
		}
	})
	h := testHost(t)
	connect(t, h, wh)
	var got []*pb.Receipt
	r := New(h, testProto, staticTable{cand(string(wh.ID()), 0, 4, 100, 0, demoModel)},
		WithReceipts(h.Peerstore().PrivKey(h.ID()), func(rc *pb.Receipt) { got = append(got, rc) }))
	res, err := r.Query(CountersignLater(t.Context()), chat("one two three"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	rc := res.Done.GetReceipt()
	if rc == nil || receipt.Countersigned(rc) {
		t.Fatalf("receipt %v: want it checked, not countersigned", rc)
	}
	if err := receipt.VerifyWorker(rc); err != nil {
		t.Fatal(err)
	}
	if u := rc.ProtoReflect().GetUnknown(); len(u) != 0 {
		t.Fatalf("unknown fields kept: %x", u)
	}
	if len(got) != 1 || got[0] != rc {
		t.Fatalf("the callback got %d receipts", len(got))
	}
	// Unmarked, the same router countersigns at once.
	res, err = r.Query(t.Context(), chat("one two three"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := receipt.Verify(res.Done.GetReceipt()); err != nil {
		t.Fatalf("an unmarked query's receipt: %v", err)
	}
}

// waitFor polls cond for up to 10 s (generous: the machine is shared).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for range 1000 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met within 10 s")
}

// TestInventedFiguresRefused: a worker that signs figures the answer
// rules out (days of work and billions of tokens for a short answer, more
// power than any machine draws) gets no countersignature: nothing is
// recorded, the figures the client sees are what the router saw, and the
// worker's breaker counts a violation. Before, the router countersigned
// them and its ledger credited the worker with days.
func TestInventedFiguresRefused(t *testing.T) {
	for _, signed := range []bool{true, false} {
		t.Run(fmt.Sprintf("receipt %v", signed), func(t *testing.T) { inventedFigures(t, signed) })
	}
}

// inventedFigures is TestInventedFiguresRefused with or without a
// receipt signed over the lies (without one, the figures still reach the
// client, and are checked all the same).
func inventedFigures(t *testing.T, signed bool) {
	wh := testHost(t)
	wkey := wh.Peerstore().PrivKey(wh.ID())
	w := worker.New([]backend.Backend{demo.New("liar", demo.WithDelay(0))})
	w.Refresh(context.Background())
	wh.SetStreamHandler(testProto, func(s network.Stream) {
		defer s.Close()
		var req pb.QueryRequest
		if err := protocol.NewFrameReader(s, protocol.MaxRequestFrame).Read(&req); err != nil {
			s.Reset()
			return
		}
		out := receipt.NewOutputHash()
		write := func(ev *pb.Event) error { out.Add(ev); return protocol.WriteFrame(s, ev) }
		done, err := w.ServeFor(context.Background(), s.Conn().RemotePeer(), &req, write)
		if err != nil {
			s.Reset()
			return
		}
		// Self-consistent lies: Done and a receipt signed over them.
		done.Usage = &pb.Usage{PromptTokens: 4_000_000_000, CompletionTokens: 4_000_000_000}
		done.Timing = &pb.Timing{TtftMs: 1, TotalMs: 4_000_000_000}
		done.EnergyMj = 1 << 62
		done.Receipt = nil
		if signed {
			rc := receipt.New(&req, done, out.Sum(), wh.ID(), s.Conn().RemotePeer(), time.Now())
			if err := receipt.Sign(rc, wkey); err != nil {
				s.Reset()
				return
			}
			done.Receipt = rc
		}
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: done}})
	})
	r, rled := receiptRouter(t, wh)
	res, err := r.Query(t.Context(), chat("one two"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if res.Done.GetReceipt() != nil {
		t.Fatal("a receipt of invented figures was countersigned")
	}
	if s := rled.Snapshot(); len(s.Peers) != 0 {
		t.Fatalf("invented figures were recorded: %+v", s.Peers)
	}
	if u, tm := res.Done.GetUsage(), res.Done.GetTiming(); u.GetPromptTokens() > 100 || u.GetCompletionTokens() > 100 || tm.GetTotalMs() > 60_000 || res.Done.GetEnergyMj() != 0 {
		t.Fatalf("the client was handed the invented figures: usage %v, timing %v, %d mJ", u, tm, res.Done.GetEnergyMj())
	}
	r.mu.Lock()
	score := r.state(wh.ID()).tracker.Score()
	r.mu.Unlock()
	if score >= 100 {
		t.Fatalf("worker health %.0f after invented figures, want a violation counted", score)
	}
}

// TestAnEmptyAnswerIsSettledOnItsOwnAttempt: an empty answer set aside
// while another worker tries is held to what its own attempt showed, not
// to the time the later attempts took: a liar answering nothing at once
// cannot claim figures that grow with the other workers' time.
func TestAnEmptyAnswerIsSettledOnItsOwnAttempt(t *testing.T) {
	liar := fakeWorker(t, func(s network.Stream, req *pb.QueryRequest) {
		defer s.Close()
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{Model: req.GetModel(), FinishReason: protocol.FinishStop,
			Usage: &pb.Usage{CompletionTokens: 15000}, Timing: &pb.Timing{TtftMs: 1, TotalMs: 1900}}}})
	})
	// Beats for 2 s without a word, then dies: the query's last hope.
	dying := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		for range 8 {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 250}}})
			time.Sleep(250 * time.Millisecond)
		}
		s.Reset()
	})
	h := testHost(t)
	connect(t, h, liar, dying)
	// The liar ranks first (its 1 ms first token), as a liar would.
	table := staticTable{cand(string(liar.ID()), 0, 4, 100, 0, demoModel), cand(string(dying.ID()), 0, 4, 100, time.Second, demoModel)}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond),
		WithReceipts(h.Peerstore().PrivKey(h.ID()), func(*pb.Receipt) {}))
	res, err := r.Query(t.Context(), chat("hello"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if res.Peer != liar.ID() {
		t.Fatalf("answered by %s, want the empty answer set aside", res.Peer)
	}
	if u, tm := res.Done.GetUsage(), res.Done.GetTiming(); u.GetCompletionTokens() > 1000 || tm.GetTotalMs() > 1000 {
		t.Fatalf("the empty answer's claims passed: %d tokens in %d ms", u.GetCompletionTokens(), tm.GetTotalMs())
	}
}
