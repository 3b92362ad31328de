// Package membership closes a swarm to the peers its owner admits. The
// owner's Ed25519 key signs certificates (a member's peer ID, roles,
// expiry), open one-time invites (a nonce, roles, expiry) and
// revocations. A node of a closed swarm presents its certificate on the
// /mtor/member/1.0.0 protocol to every peer it connects to, serves query
// streams, gossip and relay reservations only to peers that presented a
// valid one, refuses connections from revoked peers (a libp2p connection
// gater) and spreads revocations on a gossipsub topic.
package membership

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
)

// Prefix starts every signed membership object: "mtorm1." base64url(body)
// "." base64url(signature), unpadded. The body is JSON; the signature is
// the owner's Ed25519 signature of SignDomain followed by the body bytes,
// so that a client in any language checks it without canonical JSON.
const (
	Prefix     = "mtorm1."
	SignDomain = "mtor-membership/1\x00"
	// MaxEncoded bounds one encoded object.
	MaxEncoded = 4096
	// MaxRoles and MaxRoleLen bound a certificate's roles.
	MaxRoles   = 8
	MaxRoleLen = 32
	// clockSkew is tolerated between the owner's and a verifier's clocks.
	clockSkew = 5 * time.Second
)

// Kinds of signed objects.
const (
	KindCert   = "cert"
	KindInvite = "invite"
	KindRevoke = "revoke"
)

// Body is the signed JSON of every object. Unused fields are left out.
type Body struct {
	Kind  string `json:"k"`
	Swarm string `json:"swarm"`
	// Owner is the owner's peer ID: it holds the Ed25519 public key that
	// signed the object.
	Owner string `json:"owner"`
	// Peer is the member (cert) or the revoked peer (revoke).
	Peer string `json:"peer,omitempty"`
	// Nonce names an open invite (invite), the invite a certificate was
	// issued for (cert), or the revoked invite (revoke).
	Nonce string   `json:"nonce,omitempty"`
	Roles []string `json:"roles,omitempty"`
	// Exp is the expiry (cert, invite), At the time of signing; both Unix
	// seconds.
	Exp int64 `json:"exp,omitempty"`
	At  int64 `json:"at"`
}

// Signed is a verified object: its body and its encoding.
type Signed struct {
	Body
	Encoded string
}

// Expires is the expiry as a time (zero time for none).
func (s Signed) Expires() time.Time {
	if s.Exp == 0 {
		return time.Time{}
	}
	return time.Unix(s.Exp, 0)
}

// PeerID is the body's peer, "" when none.
func (s Signed) PeerID() peer.ID {
	id, err := peer.Decode(s.Peer)
	if err != nil {
		return ""
	}
	return id
}

// Errors of Parse and Verify, for errors.Is.
var (
	ErrMalformed    = errors.New("malformed membership object")
	ErrBadSignature = errors.New("membership object not signed by the swarm owner")
	ErrWrongSwarm   = errors.New("membership object of another swarm")
	ErrRevoked      = errors.New("revoked")
	ErrNotMember    = errors.New("not a member of this swarm")
)

// ExpiredError says that a certificate or invite has expired, and when.
type ExpiredError struct {
	Kind string
	At   time.Time
}

func (e *ExpiredError) Error() string {
	return fmt.Sprintf("%s expired at %s (%s ago): ask the swarm's owner for a new one (mtor invite)",
		e.Kind, e.At.UTC().Format(time.RFC3339), time.Since(e.At).Round(time.Second))
}

// Owner signs for a swarm.
type Owner struct {
	key   crypto.PrivKey
	id    peer.ID
	swarm string
	now   func() time.Time
}

// OwnerOption configures an Owner.
type OwnerOption func(*Owner)

// OwnerClock sets the owner's clock (tests: invites signed in the past).
func OwnerClock(now func() time.Time) OwnerOption { return func(o *Owner) { o.now = now } }

// NewOwner makes the owner of swarm from its Ed25519 key.
func NewOwner(key crypto.PrivKey, swarm string, opts ...OwnerOption) (*Owner, error) {
	if key.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("swarm owner key: want Ed25519, got %s", key.Type())
	}
	if err := protocol.ValidateSwarm(swarm); err != nil {
		return nil, fmt.Errorf("swarm owner: %w", err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("swarm owner key: %w", err)
	}
	o := &Owner{key: key, id: id, swarm: swarm, now: time.Now}
	for _, opt := range opts {
		opt(o)
	}
	return o, nil
}

// ID is the owner's peer ID: the swarm's id.
func (o *Owner) ID() peer.ID { return o.id }

// Swarm is the swarm's name.
func (o *Owner) Swarm() string { return o.swarm }

// Cert signs a certificate for member with roles, valid for ttl. nonce
// names the invite it was issued for ("" for none).
func (o *Owner) Cert(member peer.ID, roles []string, ttl time.Duration, nonce string) (Signed, error) {
	if err := member.Validate(); err != nil {
		return Signed{}, fmt.Errorf("certificate for %q: %w", member, err)
	}
	return o.sign(Body{Kind: KindCert, Peer: member.String(), Roles: roles, Exp: o.expiry(ttl), Nonce: nonce})
}

// Invite signs an open one-time invite with roles, valid for ttl: its
// holder may redeem it once, at a node holding the owner key, for a
// certificate.
func (o *Owner) Invite(roles []string, ttl time.Duration) (Signed, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return Signed{}, fmt.Errorf("invite nonce: %w", err)
	}
	return o.sign(Body{Kind: KindInvite, Nonce: hex.EncodeToString(b[:]), Roles: roles, Exp: o.expiry(ttl)})
}

// Revoke signs the revocation of a member (p) or of an invite (nonce),
// with every certificate issued for it.
func (o *Owner) Revoke(p peer.ID, nonce string) (Signed, error) {
	if (p == "") == (nonce == "") {
		return Signed{}, errors.New("revoke: name a peer or an invite, one of them")
	}
	b := Body{Kind: KindRevoke, Nonce: nonce}
	if p != "" {
		if err := p.Validate(); err != nil {
			return Signed{}, fmt.Errorf("revoke %q: %w", p, err)
		}
		b.Peer = p.String()
	}
	return o.sign(b)
}

// expiry is now+ttl in Unix seconds; 0 (never) for ttl <= 0.
func (o *Owner) expiry(ttl time.Duration) int64 {
	if ttl <= 0 {
		return 0
	}
	return o.now().Add(ttl).Unix()
}

func (o *Owner) sign(b Body) (Signed, error) {
	b.Swarm, b.Owner, b.At = o.swarm, o.id.String(), o.now().Unix()
	if err := checkBody(b); err != nil {
		return Signed{}, err
	}
	raw, err := json.Marshal(b)
	if err != nil {
		return Signed{}, fmt.Errorf("encode %s: %w", b.Kind, err)
	}
	sig, err := o.key.Sign(append([]byte(SignDomain), raw...))
	if err != nil {
		return Signed{}, fmt.Errorf("sign %s: %w", b.Kind, err)
	}
	enc := Prefix + base64.RawURLEncoding.EncodeToString(raw) + "." + base64.RawURLEncoding.EncodeToString(sig)
	if len(enc) > MaxEncoded {
		return Signed{}, fmt.Errorf("%s of %d bytes over the limit of %d", b.Kind, len(enc), MaxEncoded)
	}
	return Signed{Body: b, Encoded: enc}, nil
}

// checkBody bounds the fields of a body.
func checkBody(b Body) error {
	switch b.Kind {
	case KindCert:
		if b.Peer == "" {
			return fmt.Errorf("%w: certificate without a peer", ErrMalformed)
		}
	case KindInvite:
		if b.Nonce == "" {
			return fmt.Errorf("%w: invite without a nonce", ErrMalformed)
		}
	case KindRevoke:
		if (b.Peer == "") == (b.Nonce == "") {
			return fmt.Errorf("%w: revocation must name a peer or an invite", ErrMalformed)
		}
	default:
		return fmt.Errorf("%w: unknown kind %q", ErrMalformed, b.Kind)
	}
	if b.Peer != "" {
		if _, err := peer.Decode(b.Peer); err != nil {
			return fmt.Errorf("%w: peer %q: %v", ErrMalformed, b.Peer, err)
		}
	}
	if len(b.Nonce) > 64 {
		return fmt.Errorf("%w: nonce of %d bytes", ErrMalformed, len(b.Nonce))
	}
	if len(b.Roles) > MaxRoles {
		return fmt.Errorf("%w: %d roles, limit %d", ErrMalformed, len(b.Roles), MaxRoles)
	}
	for _, r := range b.Roles {
		if r == "" || len(r) > MaxRoleLen || strings.ContainsAny(r, ", \t\n") {
			return fmt.Errorf("%w: role %q", ErrMalformed, r)
		}
	}
	return nil
}

// Parse decodes s and checks its signature against the owner it names.
// It does not check the swarm or expiry: see Verifier.
func Parse(s string) (Signed, error) {
	s = strings.TrimSpace(s)
	if len(s) > MaxEncoded {
		return Signed{}, fmt.Errorf("%w: %d bytes, limit %d", ErrMalformed, len(s), MaxEncoded)
	}
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return Signed{}, fmt.Errorf("%w: does not start with %q", ErrMalformed, Prefix)
	}
	bodyB64, sigB64, ok := strings.Cut(rest, ".")
	if !ok {
		return Signed{}, fmt.Errorf("%w: no signature", ErrMalformed)
	}
	raw, err := base64.RawURLEncoding.DecodeString(bodyB64)
	if err != nil {
		return Signed{}, fmt.Errorf("%w: body: %v", ErrMalformed, err)
	}
	sig, err := base64.RawURLEncoding.DecodeString(sigB64)
	if err != nil {
		return Signed{}, fmt.Errorf("%w: signature: %v", ErrMalformed, err)
	}
	var b Body
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return Signed{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if err := checkBody(b); err != nil {
		return Signed{}, err
	}
	owner, err := peer.Decode(b.Owner)
	if err != nil {
		return Signed{}, fmt.Errorf("%w: owner %q: %v", ErrMalformed, b.Owner, err)
	}
	pub, err := owner.ExtractPublicKey()
	if err != nil || pub.Type() != crypto.Ed25519 {
		return Signed{}, fmt.Errorf("%w: owner %q holds no Ed25519 key", ErrMalformed, b.Owner)
	}
	if ok, err := pub.Verify(append([]byte(SignDomain), raw...), sig); err != nil || !ok {
		return Signed{}, ErrBadSignature
	}
	return Signed{Body: b, Encoded: s}, nil
}

// Verifier checks objects for one swarm and owner.
type Verifier struct {
	Swarm string
	Owner peer.ID
	Now   func() time.Time
}

// Verify parses s and checks that it is of kind, for this swarm, signed
// by its owner and not expired. An expired object is an *ExpiredError.
func (v Verifier) Verify(s, kind string) (Signed, error) {
	o, err := Parse(s)
	if err != nil {
		return Signed{}, err
	}
	if o.Kind != kind {
		return Signed{}, fmt.Errorf("%w: a %s where a %s was expected", ErrMalformed, o.Kind, kind)
	}
	if o.Owner != v.Owner.String() || o.Swarm != v.Swarm {
		return Signed{}, fmt.Errorf("%w: swarm %q of owner %s, want %q of owner %s", ErrWrongSwarm, o.Swarm, o.Owner, v.Swarm, v.Owner)
	}
	if err := v.fresh(o); err != nil {
		return Signed{}, err
	}
	return o, nil
}

func (v Verifier) fresh(o Signed) error {
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	if o.Exp != 0 && now().After(o.Expires().Add(clockSkew)) {
		what := "membership certificate"
		if o.Kind == KindInvite {
			what = "invite"
		}
		return &ExpiredError{Kind: what, At: o.Expires()}
	}
	return nil
}

// HasRole reports whether the certificate grants role; a certificate
// without roles grants every role.
func (s Signed) HasRole(role string) bool {
	return len(s.Roles) == 0 || slices.Contains(s.Roles, role)
}
