package receipt

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/oasisprotocol/curve25519-voi/curve"
	"github.com/oasisprotocol/curve25519-voi/curve/scalar"
	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// BenchmarkReceipt is the CPU cost of the receipt of one answer on both
// sides: the worker signs, the routing node checks and countersigns;
// "remote" for another node's worker, "local" for the node's own worker
// (one key, the signature not verified again: Expect.SignedHere).
// The output hash is left out (it is proportional to the output, and the
// same SHA-256 as any checksum).
//
//	go test ./protocol/receipt -run '^$' -bench Receipt
func BenchmarkReceipt(b *testing.B) {
	for _, local := range []bool{false, true} {
		name := map[bool]string{false: "remote", true: "local"}[local]
		b.Run(name, func(b *testing.B) {
			wk, wid := key(b)
			rk, rid := key(b)
			if local {
				rk, rid = wk, wid
			}
			req, evs, done := answer()
			out := hashOf(evs)
			e := Expect{Request: req, Done: done, Output: out, Worker: wid, Requester: rid, SignedHere: local}
			b.ResetTimer()
			for range b.N {
				r := New(req, done, out, wid, rid, time.Now())
				if err := Sign(r, wk); err != nil {
					b.Fatal(err)
				}
				if err := Check(r, e); err != nil {
					b.Fatal(err)
				}
				if err := Countersign(r, rk); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkOutputHashChunk is the per-token cost of the output hash, on
// the worker and on the routing node.
//
//	go test ./protocol/receipt -run '^$' -bench OutputHash -benchmem
func BenchmarkOutputHashChunk(b *testing.B) {
	ev := &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "zq "}}}
	h := NewOutputHash()
	b.ReportAllocs()
	for b.Loop() {
		h.Add(ev)
	}
}

// BenchmarkVerifyPerSignature is the CPU of one Ed25519 receipt
// signature check, the ways it could be done, interleaved in the same run
// over the same 64 signatures by one key (as a router sees its workers'):
//
//   - single: the key decoded from the signer's bytes for each signature,
//     under crypto/ed25519's rules (the path before the key cache);
//   - cached: the key expanded once, the same rules (verifySig's path for
//     a signer seen before);
//   - batch-N: curve25519-voi's batch verifier over N signatures, key
//     expanded once. Not used: batch verification can only check the
//     cofactored equation, which accepts signatures crypto/ed25519
//     refuses (docs/security.md, "Signature library"); the figures say
//     what it would save;
//   - R-subgroup: decoding a signature's R and checking that it has no
//     small-order component ([ℓ]R = 0), what batching would have to add
//     per signature to accept exactly what crypto/ed25519 accepts (with
//     the signer's key checked once): an R with such a component can
//     pass the cofactored equation and fail crypto/ed25519's.
//
// It reports µs per signature of each (the median round) and its ratio
// to single.
//
//	go test ./protocol/receipt -run '^$' -bench VerifyPerSignature -benchtime 200x
func BenchmarkVerifyPerSignature(b *testing.B) {
	const n = 64
	k, _ := key(b)
	raw, err := k.GetPublic().Raw()
	if err != nil {
		b.Fatal(err)
	}
	pub := voi.PublicKey(raw)
	exp, err := voi.NewExpandedPublicKey(pub)
	if err != nil {
		b.Fatal(err)
	}
	msgs, sigs := make([][]byte, n), make([][]byte, n)
	for i := range n {
		msgs[i] = []byte(fmt.Sprintf("%sreceipt %d with about the size of a canonical encoding, %0100d", WorkerDomain, i, i))
		if sigs[i], err = sign(k, msgs[i]); err != nil {
			b.Fatal(err)
		}
	}
	cofactored := &voi.Options{Verify: &voi.VerifyOptions{AllowSmallOrderA: true, AllowSmallOrderR: true, AllowNonCanonicalA: true}}
	batch := func(size int) func() bool {
		return func() bool {
			for i := 0; i < n; i += size {
				v := voi.NewBatchVerifierWithCapacity(size)
				for j := i; j < i+size; j++ {
					v.AddExpandedWithOptions(exp, msgs[j], sigs[j], cofactored)
				}
				if !v.VerifyBatchOnly(nil) {
					return false
				}
			}
			return true
		}
	}
	variants := []struct {
		name string
		run  func() bool
	}{
		{"single", func() bool {
			for i := range n {
				lp, err := crypto.UnmarshalEd25519PublicKey(raw)
				if err != nil {
					return false
				}
				if ok, err := verify(lp, msgs[i], sigs[i]); err != nil || !ok {
					return false
				}
			}
			return true
		}},
		{"cached", func() bool {
			for i := range n {
				if !voi.VerifyExpandedWithOptions(exp, msgs[i], sigs[i], stdlibVerify) {
					return false
				}
			}
			return true
		}},
		{"batch-1", batch(1)},
		{"batch-8", batch(8)},
		{"batch-64", batch(64)},
		{"R-subgroup", func() bool {
			for i := range n {
				var c curve.CompressedEdwardsY
				var r, lr curve.EdwardsPoint
				if _, err := c.SetBytes(sigs[i][:32]); err != nil {
					return false
				}
				if _, err := r.SetCompressedY(&c); err != nil {
					return false
				}
				lr.MultiscalarMulVartime([]*scalar.Scalar{scalar.BASEPOINT_ORDER}, []*curve.EdwardsPoint{&r})
				if !lr.IsIdentity() {
					return false
				}
			}
			return true
		}},
	}
	// Each variant's rounds are timed apart and the median kept: on a
	// shared machine a round that lost its core to another process is
	// an outlier, not the variant's cost.
	took := make([][]time.Duration, len(variants))
	b.ResetTimer()
	for range b.N {
		for i, v := range variants {
			start := time.Now()
			if !v.run() {
				b.Fatalf("%s: a good signature failed", v.name)
			}
			took[i] = append(took[i], time.Since(start))
		}
	}
	per := func(i int) float64 {
		slices.Sort(took[i])
		return float64(took[i][len(took[i])/2].Nanoseconds()) / n / 1e3
	}
	single := per(0)
	for i, v := range variants {
		m := per(i)
		b.ReportMetric(m, v.name+"-µs/sig")
		if i > 0 {
			b.ReportMetric(m/single, v.name+"/single")
		}
	}
}
