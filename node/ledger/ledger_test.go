package ledger

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func newID(t *testing.T) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func rcpt(worker, requester peer.ID, tokens, ms uint32, mj uint64) *pb.Receipt {
	return &pb.Receipt{QueryId: make([]byte, 16), Model: "demo", PromptTokens: 3, CompletionTokens: tokens,
		TotalMs: ms, EnergyMj: mj, Worker: []byte(worker), Requester: []byte(requester)}
}

func TestRecordBothSides(t *testing.T) {
	self, a, b := newID(t), newID(t), newID(t)
	l, err := Open("", self)
	if err != nil {
		t.Fatal(err)
	}
	l.Record(Consumed, rcpt(a, self, 10, 1000, 5000)) // a worked 1 s for us
	l.Record(Consumed, rcpt(a, self, 5, 500, 0))
	l.Record(Served, rcpt(self, a, 2, 300, 0)) // we worked 0.3 s for a
	l.Record(Served, rcpt(self, b, 4, 700, 0))
	l.Record(Served, rcpt(self, self, 4, 700, 0)) // ourselves: not recorded

	tests := []struct {
		peer    peer.ID
		balance int64
	}{{a, 1500 - 300}, {b, -700}, {newID(t), 0}}
	for _, tc := range tests {
		if got := l.Balance(tc.peer); got != tc.balance {
			t.Errorf("balance of %s = %d, want %d", tc.peer, got, tc.balance)
		}
	}
	s := l.Snapshot()
	if len(s.Peers) != 2 {
		t.Fatalf("peers = %d, want 2: %+v", len(s.Peers), s.Peers)
	}
	want := Sides{
		Consumed: Totals{Queries: 2, PromptTokens: 6, CompletionTokens: 15, Ms: 1500, EnergyMJ: 5000},
		Served:   Totals{Queries: 2, PromptTokens: 6, CompletionTokens: 6, Ms: 1000},
	}
	if s.Total != want {
		t.Errorf("total = %+v, want %+v", s.Total, want)
	}
	if len(s.Recent) != 4 || s.Recent[0].Peer != b.String() || s.Recent[0].Role != Served {
		t.Errorf("recent (newest first) = %+v", s.Recent)
	}
}

func TestPersisted(t *testing.T) {
	dir := t.TempDir()
	self, a := newID(t), newID(t)
	l, err := Open(dir, self)
	if err != nil {
		t.Fatal(err)
	}
	l.Record(Consumed, rcpt(a, self, 10, 1000, 0))
	if err := l.Flush(); err != nil {
		t.Fatal(err)
	}
	l2, err := Open(dir, self)
	if err != nil {
		t.Fatal(err)
	}
	if got := l2.Balance(a); got != 1000 {
		t.Fatalf("balance after reopening = %d, want 1000", got)
	}
	if s := l2.Snapshot(); len(s.Recent) != 1 || len(s.Recent[0].Receipt) == 0 {
		t.Fatalf("recent receipts after reopening: %+v", s.Recent)
	}
}

// The ledger stays within its bounds however many peers it meets, in
// memory and on disk.
func TestBounded(t *testing.T) {
	dir := t.TempDir()
	self := newID(t)
	const maxPeers, maxRecent = 50, 10
	l, err := Open(dir, self, WithMaxPeers(maxPeers), WithMaxRecent(maxRecent))
	if err != nil {
		t.Fatal(err)
	}
	var last peer.ID
	for range 2000 {
		last = newID(t)
		l.Record(Served, rcpt(self, last, 1, 10, 0))
	}
	s := l.Snapshot()
	if len(s.Peers) != maxPeers || len(s.Recent) != maxRecent {
		t.Fatalf("%d peers, %d receipts; bounds %d, %d", len(s.Peers), len(s.Recent), maxPeers, maxRecent)
	}
	if s.Dropped != 2000-maxPeers {
		t.Errorf("dropped = %d, want %d", s.Dropped, 2000-maxPeers)
	}
	if l.Balance(last) != -10 {
		t.Error("the newest peer was evicted")
	}
	if err := l.Flush(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	// Each peer entry is ~300 bytes of JSON and each receipt ~600.
	if limit := int64(maxPeers*400 + maxRecent*800); fi.Size() > limit {
		t.Errorf("ledger file is %d bytes, want at most %d", fi.Size(), limit)
	}
	// A smaller bound on reopening cuts the file's content to it.
	l2, err := Open(dir, self, WithMaxPeers(5), WithMaxRecent(2))
	if err != nil {
		t.Fatal(err)
	}
	if s := l2.Snapshot(); len(s.Peers) != 5 || len(s.Recent) != 2 {
		t.Fatalf("reopened with smaller bounds: %d peers, %d receipts", len(s.Peers), len(s.Recent))
	}
}

func TestCorruptFileMovedAside(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, FileName), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Open(dir, newID(t))
	if err != nil {
		t.Fatalf("open with a corrupt file: %v", err)
	}
	if len(l.Snapshot().Peers) != 0 {
		t.Error("a corrupt file gave peers")
	}
	if _, err := os.Stat(filepath.Join(dir, FileName+".bad")); err != nil {
		t.Errorf("corrupt file not kept aside: %v", err)
	}
}

func TestCountersignedOncePerServedReceipt(t *testing.T) {
	self, a := newID(t), newID(t)
	l, err := Open("", self)
	if err != nil {
		t.Fatal(err)
	}
	served := rcpt(self, a, 4, 100, 0)
	served.QueryId[0], served.WorkerSig = 9, []byte("worker-sig")
	l.Record(Served, served)
	back := func(mod func(*pb.Receipt)) *pb.Receipt {
		r := proto.CloneOf(served)
		r.RouterSig = []byte("router-sig")
		if mod != nil {
			mod(r)
		}
		return r
	}
	tests := []struct {
		name string
		r    *pb.Receipt
		want error
	}{
		{"another worker signature", back(func(r *pb.Receipt) { r.WorkerSig = []byte("other") }), ErrNotPending},
		{"another query", back(func(r *pb.Receipt) { r.QueryId = make([]byte, 16) }), ErrNotPending},
		{"another requester", back(func(r *pb.Receipt) { r.Requester = []byte(self) }), ErrNotPending},
		{"the one served", back(nil), nil},
		{"the same again", back(nil), ErrNotPending},
	}
	for _, tc := range tests {
		if err := l.Countersigned(tc.r); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	s := l.Snapshot()
	if s.Peers[0].ServedCountersigned != 1 {
		t.Fatalf("served_countersigned = %d, want 1", s.Peers[0].ServedCountersigned)
	}
	var kept pb.Receipt
	if err := proto.Unmarshal(s.Recent[0].Receipt, &kept); err != nil || string(kept.GetRouterSig()) != "router-sig" {
		t.Fatalf("recent copy not replaced by the countersigned one: %v %v", &kept, err)
	}
	// Receipts awaiting a countersignature are bounded.
	for i := range 3000 {
		r := rcpt(self, a, 1, 1, 0)
		r.QueryId[0], r.QueryId[1] = byte(i), byte(i>>8)
		l.Record(Served, r)
	}
	if len(l.pending) != maxPending || l.order.Len() != maxPending {
		t.Fatalf("%d receipts pending, bound %d", len(l.pending), maxPending)
	}
}

// TestPendingEvictsOldestAwaiting: receipts taken back leave the pending
// set at once (no search of its order); when the set is full the oldest
// receipt still awaiting its countersignature goes, never one recorded
// again after it came back, and the order kept for eviction stays within
// twice the bound however many come back.
func TestPendingEvictsOldestAwaiting(t *testing.T) {
	self, a := newID(t), newID(t)
	l, err := Open("", self)
	if err != nil {
		t.Fatal(err)
	}
	receiptOf := func(i int) *pb.Receipt {
		r := rcpt(self, a, 1, 1, 0)
		r.QueryId[0], r.QueryId[1], r.WorkerSig = byte(i), byte(i>>8), []byte("sig")
		return r
	}
	serve := func(i int) { l.Record(Served, receiptOf(i)) }
	back := func(i int) error {
		r := receiptOf(i)
		r.RouterSig = []byte("router-sig")
		return l.Countersigned(r)
	}
	for i := range maxPending {
		serve(i)
	}
	for i := range maxPending / 2 { // the older half comes back
		if err := back(i); err != nil {
			t.Fatalf("countersign %d: %v", i, err)
		}
	}
	serve(0) // served again after its countersignature came back
	for i := maxPending; i < maxPending+maxPending/2-1; i++ {
		serve(i) // fills the set without evicting
	}
	pending := func(i int) bool { r := receiptOf(i); return l.Pending(r.GetQueryId(), r.GetWorkerSig()) != nil }
	if len(l.pending) != maxPending || !pending(maxPending/2) || !pending(0) {
		t.Fatalf("%d pending; %d pending %v, 0 again %v", len(l.pending), maxPending/2, pending(maxPending/2), pending(0))
	}
	serve(5000) // one over: the oldest awaiting goes
	tests := []struct {
		name string
		i    int
		want bool
	}{
		{"oldest awaiting", maxPending / 2, false},
		{"next oldest", maxPending/2 + 1, true},
		{"served again after coming back", 0, true},
		{"came back", 1, false},
		{"newest", 5000, true},
	}
	for _, tc := range tests {
		if got := pending(tc.i); got != tc.want {
			t.Errorf("%s (%d): pending %v, want %v", tc.name, tc.i, got, tc.want)
		}
	}
	// Many served and taken back at once (each serve, into a full set,
	// evicts one older receipt): the order holds exactly the pending
	// receipts, within the bound.
	for i := 6000; i < 6000+5*maxPending; i++ {
		serve(i)
		if err := back(i); err != nil {
			t.Fatalf("countersign %d: %v", i, err)
		}
		if l.order.Len() != len(l.pending) || len(l.pending) > maxPending {
			t.Fatalf("order of %d entries for %d pending, bound %d", l.order.Len(), len(l.pending), maxPending)
		}
	}
	if len(l.pending) != maxPending-1 || l.order.Len() != len(l.pending) {
		t.Fatalf("%d pending, want %d; order of %d", len(l.pending), maxPending-1, l.order.Len())
	}
}

// BenchmarkCountersigned: a receipt comes back while 1 023 others await
// theirs (a worker serving faster than routers return them), and the next
// answer is served; the one back is the oldest awaiting or the newest.
func BenchmarkCountersigned(b *testing.B) {
	for _, newest := range []bool{false, true} {
		name := "oldest"
		if newest {
			name = "newest"
		}
		b.Run(name, func(b *testing.B) {
			self, a := peer.ID("self"), peer.ID("router")
			l, err := Open("", self)
			if err != nil {
				b.Fatal(err)
			}
			receiptOf := func(i int) *pb.Receipt {
				r := rcpt(self, a, 1, 1, 0)
				r.QueryId[0], r.QueryId[1], r.QueryId[2], r.WorkerSig = byte(i), byte(i>>8), byte(i>>16), []byte("sig")
				return r
			}
			for i := range maxPending {
				l.Record(Served, receiptOf(i))
			}
			backs := make([]*pb.Receipt, b.N)
			for n := range backs {
				i := n // the oldest awaiting
				if newest {
					i = maxPending + n - 1
				}
				backs[n] = receiptOf(i)
				backs[n].RouterSig = []byte("router-sig")
			}
			b.ResetTimer()
			for n := range b.N {
				if err := l.Countersigned(backs[n]); err != nil {
					b.Fatal(err)
				}
				l.Record(Served, receiptOf(maxPending+n))
			}
		})
	}
}

// TestTotalsSaturate: a receipt's figures are the worker's own, and one
// claiming nearly 2^64 mJ stops its peer's and the ledger's energy at the
// maximum rather than wrapping them round to small, wrong numbers.
func TestTotalsSaturate(t *testing.T) {
	self, honest, liar := newID(t), newID(t), newID(t)
	l, err := Open("", self)
	if err != nil {
		t.Fatal(err)
	}
	l.Record(Consumed, rcpt(honest, self, 1, 100, 5000))
	l.Record(Consumed, rcpt(liar, self, 1, 100, math.MaxUint64-1000))
	l.Record(Consumed, rcpt(liar, self, 1, 100, 5000))
	s := l.Snapshot()
	if got := s.Total.Consumed.EnergyMJ; got != math.MaxUint64 {
		t.Fatalf("total energy %d, want it stopped at the maximum", got)
	}
	for _, e := range s.Peers {
		want := uint64(5000)
		if e.Peer == liar.String() {
			want = math.MaxUint64
		}
		if e.Consumed.EnergyMJ != want {
			t.Errorf("%s: energy %d, want %d", e.Peer, e.Consumed.EnergyMJ, want)
		}
	}
}

// TestServedTwiceEachAwaits: a worker asked the same query again (its
// first answer's stream fell silent at the router) signs a second receipt
// for it. Each awaits its own countersignature, by its worker signature:
// the second comes back and is taken, whichever was recorded last, and
// the first still awaits. Both answers stay counted as served, each
// recent copy with its own receipt.
func TestServedTwiceEachAwaits(t *testing.T) {
	for _, order := range []string{"first recorded first", "second recorded first"} {
		t.Run(order, func(t *testing.T) {
			self, a := newID(t), newID(t)
			l, err := Open("", self)
			if err != nil {
				t.Fatal(err)
			}
			first := rcpt(self, a, 4, 100, 0)
			first.QueryId[0], first.WorkerSig = 7, []byte("first-sig")
			again := proto.CloneOf(first)
			again.TotalMs, again.WorkerSig = 120, []byte("second-sig")
			if order == "first recorded first" {
				l.Record(Served, first)
				l.Record(Served, again)
			} else {
				l.Record(Served, again)
				l.Record(Served, first)
			}
			back := proto.CloneOf(again)
			back.RouterSig = []byte("router-sig")
			if err := l.Countersigned(back); err != nil {
				t.Fatalf("the second receipt countersigned: %v", err)
			}
			if p := l.Pending(first.GetQueryId(), first.GetWorkerSig()); p == nil || l.Pending(again.GetQueryId(), again.GetWorkerSig()) != nil {
				t.Fatalf("pending first %v, second %v: want the first only", p, l.Pending(again.GetQueryId(), again.GetWorkerSig()))
			}
			s := l.Snapshot()
			if s.Peers[0].Served.Queries != 2 || s.Peers[0].ServedCountersigned != 1 || len(l.pending) != 1 || l.order.Len() != 1 {
				t.Fatalf("served %d, countersigned %d, %d pending (order %d); want 2, 1, 1", s.Peers[0].Served.Queries, s.Peers[0].ServedCountersigned, len(l.pending), l.order.Len())
			}
			bySig := map[string]string{} // worker signature -> router signature, of each recent copy
			for _, rc := range s.Recent {
				var r pb.Receipt
				if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
					t.Fatal(err)
				}
				bySig[string(r.GetWorkerSig())] = string(r.GetRouterSig())
			}
			if f, ok := bySig["first-sig"]; len(s.Recent) != 2 || !ok || f != "" || bySig["second-sig"] != "router-sig" {
				t.Fatalf("recent copies %v (worker signature: router signature), want the first as served and the second countersigned", bySig)
			}
		})
	}
}

// TestPendingAfterRestart: the served receipts still awaiting their
// countersignature when the node stopped await it in the next process,
// which takes it; those that had come back, and the consumed ones, do
// not.
func TestPendingAfterRestart(t *testing.T) {
	dir := t.TempDir()
	self, a := newID(t), newID(t)
	l, err := Open(dir, self)
	if err != nil {
		t.Fatal(err)
	}
	waiting, back, consumed := rcpt(self, a, 4, 100, 0), rcpt(self, a, 5, 100, 0), rcpt(a, self, 6, 100, 0)
	waiting.QueryId[0], back.QueryId[0], consumed.QueryId[0] = 1, 2, 3
	waiting.WorkerSig, back.WorkerSig, consumed.WorkerSig = []byte("w1"), []byte("w2"), []byte("w3")
	l.Record(Served, waiting)
	l.Record(Served, back)
	l.Record(Consumed, consumed)
	cs := proto.CloneOf(back)
	cs.RouterSig = []byte("router-sig")
	if err := l.Countersigned(cs); err != nil {
		t.Fatal(err)
	}
	if err := l.Flush(); err != nil {
		t.Fatal(err)
	}

	again, err := Open(dir, self)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []*pb.Receipt{back, consumed} {
		if again.Pending(r.GetQueryId(), r.GetWorkerSig()) != nil {
			t.Fatalf("receipt %x awaits a countersignature after the restart", r.GetQueryId())
		}
	}
	if again.Pending(waiting.GetQueryId(), waiting.GetWorkerSig()) == nil {
		t.Fatal("the served receipt still waiting does not await its countersignature after the restart")
	}
	cw := proto.CloneOf(waiting)
	cw.RouterSig = []byte("router-sig")
	if err := again.Countersigned(cw); err != nil {
		t.Fatalf("the countersignature that came after the restart: %v", err)
	}
	if got := again.Snapshot().Peers[0].ServedCountersigned; got != 2 {
		t.Fatalf("%d served answers countersigned, want 2", got)
	}
}
