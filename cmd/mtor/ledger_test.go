package main

import (
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

func TestVerifyRecent(t *testing.T) {
	keyOf := func() (crypto.PrivKey, peer.ID) {
		k, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		id, _ := peer.IDFromPrivateKey(k)
		return k, id
	}
	wk, wid := keyOf()
	rk, rid := keyOf()
	req := &pb.QueryRequest{Id: make([]byte, 16), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo"}
	done := &pb.Done{Model: "demo", Usage: &pb.Usage{CompletionTokens: 3}, Timing: &pb.Timing{TotalMs: 9}}
	out := receipt.NewOutputHash().Sum()
	signed := receipt.New(req, done, out, wid, rid, time.Now())
	if err := receipt.Sign(signed, wk); err != nil {
		t.Fatal(err)
	}
	both := proto.CloneOf(signed)
	if err := receipt.Countersign(both, rk); err != nil {
		t.Fatal(err)
	}
	raw := func(r *pb.Receipt, mod func(*pb.Receipt)) []byte {
		r = proto.CloneOf(r)
		if mod != nil {
			mod(r)
		}
		b, _ := proto.Marshal(r)
		return b
	}
	tests := []struct {
		name       string
		self       peer.ID
		recent     ledger.Recent
		both, wo   int
		wantErrSub string
	}{
		{"consumed, both signatures", rid, ledger.Recent{Role: ledger.Consumed, Receipt: raw(both, nil)}, 1, 0, ""},
		{"served, confirmed", wid, ledger.Recent{Role: ledger.Served, Receipt: raw(both, nil)}, 1, 0, ""},
		{"served, not yet confirmed", wid, ledger.Recent{Role: ledger.Served, Receipt: raw(signed, nil)}, 0, 1, ""},
		{"consumed without countersignature", rid, ledger.Recent{Role: ledger.Consumed, Receipt: raw(signed, nil)}, 0, 0, "not countersigned"},
		{"inflated tokens", rid, ledger.Recent{Role: ledger.Consumed, Receipt: raw(both, func(r *pb.Receipt) { r.CompletionTokens = 300 })}, 0, 0, "bad receipt signature"},
		{"another node's receipt", wid, ledger.Recent{Role: ledger.Consumed, Receipt: raw(both, nil)}, 0, 0, "does not name this node"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, wo, err := verifyRecent(&ledger.Snapshot{Self: tc.self.String(), Recent: []ledger.Recent{tc.recent}})
			switch {
			case tc.wantErrSub == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.wantErrSub != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErrSub)):
				t.Fatalf("error %v, want one saying %q", err, tc.wantErrSub)
			case b != tc.both || wo != tc.wo:
				t.Fatalf("%d verified, %d worker only; want %d, %d", b, wo, tc.both, tc.wo)
			}
		})
	}
}
