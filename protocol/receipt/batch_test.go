package receipt

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// workerReceipts are n receipts of one worker for one routing node,
// signed by the worker, and the routing node's key.
func workerReceipts(t testing.TB, n int) ([]*pb.Receipt, crypto.PrivKey) {
	t.Helper()
	wk, wid := key(t)
	rk, rid := key(t)
	req, evs, done := answer()
	rs := make([]*pb.Receipt, n)
	for i := range rs {
		rq := proto.CloneOf(req)
		rq.Id[1] = byte(i)
		rs[i] = New(rq, done, hashOf(evs), wid, rid, time.Now())
		if err := Sign(rs[i], wk); err != nil {
			t.Fatal(err)
		}
	}
	return rs, rk
}

// TestBatchCountersignature: every receipt of a batch verifies by its
// proof and the one signature, and its tree is RFC 6962's as
// transparency-dev/merkle builds it (the root its compact range gets,
// each proof verified against that root by its verifier).
func TestBatchCountersignature(t *testing.T) {
	for _, n := range []int{1, 2, 3, 5, 8, 13, 33, 64} {
		rs, rk := workerReceipts(t, n)
		if err := CountersignBatch(rs, rk); err != nil {
			t.Fatal(err)
		}
		rf := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
		cr := rf.NewEmptyRange(0)
		leaves := make([][]byte, n)
		for i, r := range rs {
			b, err := SigningBytes(r, true)
			if err != nil {
				t.Fatal(err)
			}
			leaves[i] = rfc6962.DefaultHasher.HashLeaf(b)
			if err := cr.Append(leaves[i], nil); err != nil {
				t.Fatal(err)
			}
		}
		root, err := cr.GetRootHash(nil)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range rs {
			bs := r.GetRouterBatch()
			if bs.GetIndex() != uint32(i) || bs.GetSize() != uint32(n) || len(r.GetRouterSig()) != 0 {
				t.Fatalf("n=%d: receipt %d carries leaf %d of %d", n, i, bs.GetIndex(), bs.GetSize())
			}
			if err := proof.VerifyInclusion(rfc6962.DefaultHasher, uint64(i), uint64(n), leaves[i], bs.GetProof(), root); err != nil {
				t.Fatalf("n=%d: receipt %d's proof against the library's root: %v", n, i, err)
			}
			if err := Verify(r); err != nil {
				t.Fatalf("n=%d: receipt %d: %v", n, i, err)
			}
			if err := VerifyRouter(r); err != nil {
				t.Fatalf("n=%d: receipt %d: %v", n, i, err)
			}
			// It travels as any receipt does.
			var back pb.Receipt
			raw, _ := proto.Marshal(r)
			if err := proto.Unmarshal(raw, &back); err != nil || Verify(&back) != nil {
				t.Fatalf("n=%d: receipt %d after a round trip: %v", n, i, Verify(&back))
			}
		}
	}
	rs, rk := workerReceipts(t, 65)
	if err := CountersignBatch(rs, rk); err == nil {
		t.Fatal("a batch of 65 was countersigned")
	}
	if err := CountersignBatch(nil, rk); err == nil {
		t.Fatal("an empty batch was countersigned")
	}
}

// TestBatchCountersignatureRefused: a batch-countersigned receipt changed
// in any way that matters fails, and a forged signature fails every time
// it is met (only what verified is remembered).
func TestBatchCountersignatureRefused(t *testing.T) {
	other, _ := key(t)
	for _, tc := range []struct {
		name string
		edit func(r *pb.Receipt, rs []*pb.Receipt, rk crypto.PrivKey)
		want error
	}{
		{"a figure changed", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.CompletionTokens++ }, ErrBadSig},
		{"another leaf's place", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch.Index = 3 }, ErrBadSig},
		{"a proof hash flipped", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch.Proof[1][0] ^= 1 }, ErrBadSig},
		{"a smaller tree", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch.Size = 4 }, ErrMalformed},
		{"another tree's signature", func(r *pb.Receipt, rs []*pb.Receipt, _ crypto.PrivKey) {
			if err := CountersignBatch(rs[:4], other); err != nil {
				panic(err)
			}
			r.RouterBatch.Sig = rs[0].GetRouterBatch().GetSig()
		}, ErrBadSig},
		{"the same key's signature of another tree", func(r *pb.Receipt, rs []*pb.Receipt, rk crypto.PrivKey) {
			if err := CountersignBatch(rs[:4], rk); err != nil {
				panic(err)
			}
			r.RouterBatch.Sig = rs[0].GetRouterBatch().GetSig()
		}, ErrBadSig},
		{"leaf past the tree", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch.Index = 5 }, ErrMalformed},
		{"a tree over the bound", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch.Size = 65 }, ErrMalformed},
		{"a proof too long", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) {
			r.RouterBatch.Proof = append(r.RouterBatch.Proof, make([][]byte, maxProof)...)
		}, ErrMalformed},
		{"countersigned twice", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterSig = r.RouterBatch.Sig }, ErrMalformed},
		{"no countersignature", func(r *pb.Receipt, _ []*pb.Receipt, _ crypto.PrivKey) { r.RouterBatch = nil }, ErrNoRouterSig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, rk := workerReceipts(t, 5)
			if err := CountersignBatch(rs, rk); err != nil {
				t.Fatal(err)
			}
			// A copy: the receipts of a batch share their proofs' hashes.
			r := proto.CloneOf(rs[2])
			if err := Verify(r); err != nil {
				t.Fatal(err)
			}
			tc.edit(r, rs, rk)
			for range 2 {
				if err := Verify(r); !errors.Is(err, tc.want) {
					t.Fatalf("Verify = %v, want %v", err, tc.want)
				}
			}
			// The other receipts of the batch still verify.
			if !strings.Contains(tc.name, "another tree") {
				if err := Verify(rs[3]); err != nil {
					t.Fatalf("another receipt of the batch: %v", err)
				}
			}
		})
	}
}

// BenchmarkCountersign is the routing node's countersignature per
// receipt, alone and in batches, and the worker's check of it.
//
//	go test ./protocol/receipt -run '^$' -bench Countersign
func BenchmarkCountersign(b *testing.B) {
	b.Run("alone", func(b *testing.B) {
		rs, rk := workerReceipts(b, 1)
		for b.Loop() {
			if err := Countersign(rs[0], rk); err != nil {
				b.Fatal(err)
			}
			if err := VerifyRouter(rs[0]); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, n := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("batch-%d", n), func(b *testing.B) {
			rs, rk := workerReceipts(b, n)
			for b.Loop() {
				// Each batch comes once: its signature is checked once.
				verifiedRoots.mu.Lock()
				clear(verifiedRoots.m)
				verifiedRoots.mu.Unlock()
				if err := CountersignBatch(rs, rk); err != nil {
					b.Fatal(err)
				}
				for _, r := range rs {
					if err := VerifyRouter(r); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n)/1e3, "µs/receipt")
		})
	}
}

// TestCheckWantsAReceiptAsSent: the routing node refuses a receipt that
// comes countersigned (a worker's own invention would pass for the
// routing node's signature in its ledger); and a batch
// countersignature's proof holds at most 6 hashes of 32 bytes.
func TestCheckWantsAReceiptAsSent(t *testing.T) {
	for _, tc := range []struct {
		name  string
		edit  func(r *pb.Receipt)
		check bool // Check (else Verify of the batch-countersigned receipt)
	}{
		{"router_sig from the worker", func(r *pb.Receipt) { r.RouterSig = make([]byte, 64) }, true},
		{"router_batch from the worker", func(r *pb.Receipt) { r.RouterBatch = &pb.BatchSignature{Size: 1, Sig: make([]byte, 64)} }, true},
		{"a proof hash of 33 bytes", func(r *pb.Receipt) { r.RouterBatch.Proof[0] = append(r.RouterBatch.Proof[0], 0) }, false},
		{"a proof of 7 hashes", func(r *pb.Receipt) {
			r.RouterBatch.Proof = append(r.RouterBatch.Proof, make([][]byte, maxProof+1-len(r.RouterBatch.Proof))...)
			for i := range r.RouterBatch.Proof {
				r.RouterBatch.Proof[i] = make([]byte, 32)
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, e, rk := signed(t)
			r = asSent(r)
			if !tc.check {
				rs := []*pb.Receipt{r, proto.CloneOf(r)}
				rs[1].TimeUnixMs++
				if err := CountersignBatch(rs, rk); err != nil {
					t.Fatal(err)
				}
				r = proto.CloneOf(rs[0])
			}
			tc.edit(r)
			var err error
			if tc.check {
				err = Check(r, e)
			} else {
				err = Verify(r)
			}
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("got %v, want %v", err, ErrMalformed)
			}
		})
	}
}
