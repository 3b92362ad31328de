package membership

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

func newOwner(t *testing.T, swarm string, opts ...OwnerOption) *Owner {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOwner(k, swarm, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func newPeer(t *testing.T) peer.ID {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestVerify(t *testing.T) {
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	o, _ := NewOwner(k, "team")
	other := newOwner(t, "team")
	// The same key with its clock an hour behind.
	past, _ := NewOwner(k, "team", OwnerClock(func() time.Time { return time.Now().Add(-time.Hour) }))
	member := newPeer(t)
	cert, err := o.Cert(member, []string{"worker"}, time.Hour, "")
	if err != nil {
		t.Fatal(err)
	}
	inv, _ := o.Invite(nil, time.Hour)
	expired, _ := past.Invite(nil, time.Minute)
	forgedCert, _ := other.Cert(member, nil, time.Hour, "")
	never, _ := o.Cert(member, nil, 0, "")
	// A body changed after signing: the roles widened.
	body, sig, _ := strings.Cut(strings.TrimPrefix(cert.Encoded, Prefix), ".")
	raw, _ := base64.RawURLEncoding.DecodeString(body)
	tampered := Prefix + base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(raw), `"worker"`, `"admin"`, 1))) + "." + sig

	v := Verifier{Swarm: "team", Owner: o.ID()}
	tests := []struct {
		name    string
		enc     string
		kind    string
		wantErr error
		expired bool
	}{
		{"certificate", cert.Encoded, KindCert, nil, false},
		{"certificate without expiry", never.Encoded, KindCert, nil, false},
		{"open invite", inv.Encoded, KindInvite, nil, false},
		{"invite where a certificate is wanted", inv.Encoded, KindCert, ErrMalformed, false},
		{"signed by another key", forgedCert.Encoded, KindCert, ErrWrongSwarm, false},
		{"body changed after signing", tampered, KindCert, ErrBadSignature, false},
		{"expired invite", expired.Encoded, KindInvite, nil, true},
		{"not an object", "hello", KindCert, ErrMalformed, false},
		{"too long", Prefix + strings.Repeat("A", MaxEncoded), KindCert, ErrMalformed, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := v.Verify(tc.enc, tc.kind)
			var exp *ExpiredError
			switch {
			case tc.expired:
				if !errors.As(err, &exp) || !strings.Contains(err.Error(), "invite expired at") {
					t.Fatalf("err = %v, want an expired invite", err)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
			case err != nil:
				t.Fatalf("err = %v", err)
			case got.Kind != tc.kind:
				t.Fatalf("kind %q", got.Kind)
			}
		})
	}
	if c, _ := v.Verify(cert.Encoded, KindCert); c.PeerID() != member || !c.HasRole("worker") || c.HasRole("relay") {
		t.Errorf("certificate fields: %+v", c)
	}
}

// Revocations cut off the certificates they name, and what the owner
// redeemed once is refused to another peer.
func TestRevokeAndRedeem(t *testing.T) {
	o := newOwner(t, "team")
	m, err := New("team", o.ID(), WithOwner(o), WithStateDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	a, b := newPeer(t), newPeer(t)
	inv, _ := o.Invite([]string{"worker"}, time.Hour)
	c, err := m.redeem(inv.Encoded, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.redeem(inv.Encoded, a); err != nil {
		t.Errorf("the same peer redeeming again (a restart): %v", err)
	}
	if _, err := m.redeem(inv.Encoded, b); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Errorf("a second peer redeemed a one-time invite: %v", err)
	}
	if _, err := m.accept(c.Encoded, b); !errors.Is(err, ErrNotMember) {
		t.Errorf("a certificate presented by another peer: %v", err)
	}
	if _, err := m.accept(c.Encoded, a); err != nil || !m.IsMember(a) {
		t.Fatalf("accept: %v", err)
	}
	r, _ := o.Revoke("", inv.Nonce)
	if _, isNew, err := m.Revoke(r.Encoded); err != nil || !isNew {
		t.Fatalf("revoke: %v %v", isNew, err)
	}
	if m.IsMember(a) {
		t.Error("a member whose invite was revoked is still a member")
	}
	if _, isNew, _ := m.Revoke(r.Encoded); isNew {
		t.Error("a known revocation counted as new")
	}
	// A restart keeps the revocation and the redemption.
	m2, err := New("team", o.ID(), WithOwner(o), WithStateDir(m.dir))
	if err != nil {
		t.Fatal(err)
	}
	if got := m2.Revocations(10); len(got) != 1 || got[0] != r.Encoded {
		t.Errorf("revocations after restart: %v", got)
	}
	if _, err := m2.redeem(inv.Encoded, a); !errors.Is(err, ErrRevoked) {
		t.Errorf("redeeming a revoked invite: %v", err)
	}
}

// An invite redeemed within the clock skew after its end (which Verify
// tolerates) gives a certificate that ends with it, never one without an
// end.
func TestInviteRedeemedAtItsEndGivesNoEndlessCert(t *testing.T) {
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	past, err := NewOwner(k, "team", OwnerClock(func() time.Time { return time.Now().Add(-time.Hour) }))
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOwner(k, "team")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := past.Invite([]string{"worker"}, time.Hour-2*time.Second) // ended 2 s ago
	if err != nil {
		t.Fatal(err)
	}
	m, err := New("team", o.ID(), WithOwner(o))
	if err != nil {
		t.Fatal(err)
	}
	c, err := m.redeem(inv.Encoded, newPeer(t))
	if err != nil {
		t.Fatalf("an invite ended 2 s ago, within the clock skew Verify tolerates, refused: %v", err)
	}
	if c.Exp == 0 || time.Unix(c.Exp, 0).After(time.Now().Add(5*time.Second)) {
		t.Fatalf("certificate from an invite that ended ends at %d (0: never)", c.Exp)
	}
}

// A peer revoked before many later revocations still reaches a node that
// joined after them: the re-announcements take the older revocations in
// turn besides the newest, so within one turn of the list a fresh node has
// them all and refuses the revoked peer's still valid certificate.
func TestOldRevocationsReachNewNodes(t *testing.T) {
	o := newOwner(t, "team")
	owner, err := New("team", o.ID(), WithOwner(o))
	if err != nil {
		t.Fatal(err)
	}
	x := newPeer(t)
	xc, err := o.Cert(x, nil, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	rx, err := o.Revoke(x, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := owner.Revoke(rx.Encoded); err != nil {
		t.Fatal(err)
	}
	const later = 3*reannounceCount + 5
	for range later {
		inv, err := o.Invite(nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		ri, err := o.Revoke("", inv.Nonce)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := owner.Revoke(ri.Encoded); err != nil {
			t.Fatal(err)
		}
	}
	fresh, err := New("team", o.ID())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range owner.Revocations(MaxReplyRevocations) { // the handshake's
		_, _, _ = fresh.Revoke(e)
	}
	cursor := 0
	for range (later+1)/reannounceCount + 1 { // one turn of the older ones
		var batch []string
		batch, cursor = owner.reannounceBatch(cursor)
		for _, e := range batch {
			_, _, _ = fresh.Revoke(e)
		}
	}
	if _, err := fresh.accept(xc.Encoded, x); err == nil && fresh.IsMember(x) {
		t.Fatal("a node that joined after the revocation admits the revoked peer")
	}
}
