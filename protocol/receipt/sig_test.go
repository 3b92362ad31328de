package receipt

import (
	"bytes"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestSignaturesAsLibp2p: receipts are signed and verified with
// curve25519-voi; a signature must be byte for byte the one libp2p's key
// (crypto/ed25519) makes, and a signature must verify exactly when
// libp2p's verification accepts it, so that anyone checks receipts with
// any Ed25519 library.
func TestSignaturesAsLibp2p(t *testing.T) {
	k, _ := key(t)
	other, _ := key(t)
	msg := []byte(WorkerDomain + "some canonical receipt bytes")
	want, err := k.Sign(msg)
	if err != nil {
		t.Fatal(err)
	}
	got, err := sign(k, msg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("signature differs from libp2p's:\n got %x\nwant %x", got, want)
	}
	flip := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 1; return c }
	// A signature with S ≥ L (S + L, a malleated copy): crypto/ed25519
	// refuses it, and so must we.
	malleable := bytes.Clone(want)
	var carry uint16
	for i, l := range []byte{0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10} {
		s := uint16(malleable[32+i]) + uint16(l) + carry
		malleable[32+i], carry = byte(s), s>>8
	}
	tests := []struct {
		name     string
		pub      crypto.PubKey
		msg, sig []byte
	}{
		{"valid", k.GetPublic(), msg, want},
		{"other key", other.GetPublic(), msg, want},
		{"other message", k.GetPublic(), flip(msg, 3), want},
		{"R flipped", k.GetPublic(), msg, flip(want, 0)},
		{"S flipped", k.GetPublic(), msg, flip(want, 40)},
		{"S not reduced", k.GetPublic(), msg, malleable},
		{"short", k.GetPublic(), msg, want[:63]},
		{"empty", k.GetPublic(), msg, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantOK, _ := tc.pub.Verify(tc.msg, tc.sig)
			gotOK, err := verify(tc.pub, tc.msg, tc.sig)
			if err != nil || gotOK != wantOK {
				t.Fatalf("verify = %v, %v; libp2p says %v", gotOK, err, wantOK)
			}
		})
	}
	if ok, _ := verify(k.GetPublic(), msg, want); !ok {
		t.Fatal("a valid signature did not verify")
	}
}

// TestSignaturesOtherKeyTypes: a non-Ed25519 key signs and verifies as
// libp2p does.
func TestSignaturesOtherKeyTypes(t *testing.T) {
	k, pub, err := crypto.GenerateSecp256k1Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("receipt")
	sig, err := sign(k, msg)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := verify(pub, msg, sig); err != nil || !ok {
		t.Fatalf("secp256k1: %v, %v", ok, err)
	}
	if ok, _ := verify(pub, []byte("receipt!"), sig); ok {
		t.Fatal("secp256k1 signature verified over other bytes")
	}
}

// TestVerifyRouter: the countersignature alone, as a worker checks the
// receipt it signed itself.
func TestVerifyRouter(t *testing.T) {
	r, _, _ := signed(t)
	if err := VerifyRouter(r); err != nil {
		t.Fatalf("honest: %v", err)
	}
	bad := flipRouterSig(r)
	if err := VerifyRouter(bad); err == nil {
		t.Fatal("a broken countersignature verified")
	}
	none := flipRouterSig(r)
	none.RouterSig = nil
	if err := VerifyRouter(none); !errors.Is(err, ErrNoRouterSig) {
		t.Fatalf("no countersignature: %v", err)
	}
}

func flipRouterSig(r *pb.Receipt) *pb.Receipt {
	c := proto.CloneOf(r)
	c.RouterSig[5] ^= 1
	return c
}
