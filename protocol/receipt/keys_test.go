package receipt

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestCachedKeysAsLibp2p: a signer's cached, expanded key verifies
// exactly what libp2p (crypto/ed25519) accepts, including a key
// crypto/ed25519 takes and a strict verifier would not (small order);
// a key that is no point is not cached, and verifies nothing.
func TestCachedKeysAsLibp2p(t *testing.T) {
	k, _ := key(t)
	other, _ := key(t)
	msg := []byte(WorkerDomain + "some canonical receipt bytes")
	good, err := k.Sign(msg)
	if err != nil {
		t.Fatal(err)
	}
	flip := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 1; return c }
	// The identity point as public key: [k]A is the identity for every
	// message, so R = B, S = 1 verifies under crypto/ed25519's rules.
	identity := make([]byte, 32)
	identity[0] = 1
	basepoint := bytes.Repeat([]byte{0x66}, 32)
	basepoint[0] = 0x58
	smallOrderSig := append(bytes.Clone(basepoint), make([]byte, 32)...)
	smallOrderSig[32] = 1
	// A y that is not on the curve (y = 2 has no x).
	notAPoint := make([]byte, 32)
	notAPoint[0] = 2
	rawPub := func(k crypto.PrivKey) []byte {
		b, err := k.GetPublic().Raw()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name     string
		pub      []byte
		msg, sig []byte
	}{
		{"valid", rawPub(k), msg, good},
		{"other key", rawPub(other), msg, good},
		{"other message", rawPub(k), flip(msg, 3), good},
		{"R flipped", rawPub(k), msg, flip(good, 0)},
		{"S flipped", rawPub(k), msg, flip(good, 40)},
		{"short", rawPub(k), msg, good[:63]},
		{"small-order key", identity, msg, smallOrderSig},
		{"small-order key, other message", identity, []byte("anything"), smallOrderSig},
		{"not a point", notAPoint, msg, good},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			lpub, err := crypto.UnmarshalEd25519PublicKey(tc.pub)
			if err != nil {
				t.Fatal(err)
			}
			want, _ := lpub.Verify(tc.msg, tc.sig)
			if std := ed25519.Verify(tc.pub, tc.msg, tc.sig); std != want {
				t.Fatalf("libp2p says %v, crypto/ed25519 %v", want, std)
			}
			c := newKeyCache(4)
			signer := []byte("signer " + tc.name)
			if c.get(signer) != nil {
				t.Fatal("an empty cache knew the signer")
			}
			exp := c.put(signer, tc.pub)
			if exp == nil {
				if want {
					t.Fatal("a key libp2p verifies with was not expanded")
				}
				return // not a point: verifySig refuses without a key
			}
			for use := range 2 {
				if got := verifyExpanded(c.get(signer), tc.msg, tc.sig); got != want {
					t.Fatalf("use %d: verify = %v; libp2p says %v", use, got, want)
				}
			}
		})
	}
}

// TestCachedKeysThroughCheck: receipts of the same workers checked again
// and again, as a router does, pass while honest and fail once changed,
// whether a worker's key is new, cached or evicted in between.
func TestCachedKeysThroughCheck(t *testing.T) {
	const workers = 3
	var rs []*pb.Receipt
	var es []Expect
	for range workers {
		r, e, _ := signed(t)
		rs, es = append(rs, r), append(es, e)
	}
	for _, tc := range []struct {
		name string
		size int
	}{
		{"all cached", maxCachedKeys},
		{"evicted each time", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func(c *keyCache) { signerKeys = c }(signerKeys)
			signerKeys = newKeyCache(tc.size)
			for i := range 3 * workers {
				r, e := rs[i%workers], es[i%workers]
				if err := Check(asSent(r), e); err != nil {
					t.Fatalf("honest, check %d: %v", i, err)
				}
				if err := Verify(proto.CloneOf(r)); err != nil {
					t.Fatalf("honest, verify %d: %v", i, err)
				}
				bad := asSent(r)
				bad.WorkerSig[i] ^= 1
				if err := Check(bad, e); !errors.Is(err, ErrBadSig) {
					t.Fatalf("a broken worker signature, check %d: %v", i, err)
				}
				forged := asSent(r)
				forged.CompletionTokens++
				fe := e
				fe.Done = proto.CloneOf(e.Done)
				fe.Done.Usage.CompletionTokens++
				if err := Check(forged, fe); !errors.Is(err, ErrBadSig) {
					t.Fatalf("changed figures under the old signature, check %d: %v", i, err)
				}
				if n := signerKeys.len(); n > tc.size {
					t.Fatalf("%d keys cached; bound %d", n, tc.size)
				}
			}
		})
	}
}

// TestKeyCacheBounded: the cache never holds more than its bound.
func TestKeyCacheBounded(t *testing.T) {
	const max = 8
	c := newKeyCache(max)
	identity := make([]byte, 32)
	identity[0] = 1
	for i := range 3 * max {
		if c.put([]byte(fmt.Sprint("signer ", i)), identity) == nil {
			t.Fatal("the identity point was not expanded")
		}
		if n := c.len(); n > max {
			t.Fatalf("%d keys cached after %d signers; bound %d", n, i+1, max)
		}
	}
}

// TestKeyCacheConcurrent: routers verify from many goroutines at once
// (run with -race).
func TestKeyCacheConcurrent(t *testing.T) {
	const signers = 4
	type rec struct {
		signer, msg, sig []byte
	}
	var recs []rec
	for i := range signers {
		k, id := key(t)
		msg := []byte(fmt.Sprint("receipt ", i))
		sig, err := k.Sign(msg)
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, rec{[]byte(id), msg, sig})
	}
	c := newKeyCache(2) // smaller than the signers: evictions too
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				r := recs[(g+i)%signers]
				exp := c.get(r.signer)
				if exp == nil {
					pub, err := peer.ID(r.signer).ExtractPublicKey()
					if err != nil {
						t.Error(err)
						return
					}
					exp = c.put(r.signer, ed25519Raw(pub))
				}
				if !verifyExpanded(exp, r.msg, r.sig) {
					t.Error("a good signature failed")
					return
				}
			}
		}()
	}
	wg.Wait()
}
