package worker

import (
	"context"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// TestReceiptCarriesMeasuredEnergy: the signed receipt of an answer holds
// the energy the meter measured (fakeMeter stands in for NVML, which this
// machine lacks) and the figures of Done, and the worker's signature
// verifies.
func TestReceiptCarriesMeasuredEnergy(t *testing.T) {
	h := loopbackHost(t)
	w := newWorker(t, demo.New("w", demo.WithDelay(0)), WithEnergyMeter(fakeMeter{}), WithSigner(h.Peerstore().PrivKey(h.ID())))
	done, err := w.Serve(context.Background(), req("a b c d"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	r := done.GetReceipt()
	if r.GetEnergyMj() != 500 || r.GetCompletionTokens() != done.GetUsage().GetCompletionTokens() || r.GetTotalMs() != done.GetTiming().GetTotalMs() {
		t.Fatalf("receipt %v for done %v", r, done)
	}
	if peer.ID(r.GetWorker()) != h.ID() || peer.ID(r.GetRequester()) != h.ID() {
		t.Fatal("an in-process answer's receipt names another worker or requester")
	}
	if err := receipt.VerifyWorker(r); err != nil {
		t.Fatal(err)
	}
}
