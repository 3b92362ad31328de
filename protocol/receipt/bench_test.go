package receipt

import (
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// BenchmarkReceipt is the CPU cost of the receipt of one answer on both
// sides: the worker signs, the routing node checks and countersigns.
// The output hash is left out (it is proportional to the output, and the
// same SHA-256 as any checksum).
//
//	go test ./protocol/receipt -run '^$' -bench Receipt
func BenchmarkReceipt(b *testing.B) {
	wk, wid := key(b)
	rk, rid := key(b)
	req, evs, done := answer()
	out := hashOf(evs)
	e := Expect{Request: req, Done: done, Output: out, Worker: wid, Requester: rid}
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
