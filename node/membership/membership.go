package membership

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/internal/atomicfile"
)

var log = logging.Logger("mtor/membership")

// Bounds on what a node keeps.
const (
	// MaxRevocations bounds the revocations kept (and persisted).
	MaxRevocations = 4096
	// MaxMembers bounds the certificates of peers kept; a certificate is
	// dropped when its peer disconnects, so this is a bound on peers
	// connected at once.
	MaxMembers = 16384
	// MaxRedeemed bounds the open invites an owner node remembers as used.
	MaxRedeemed = 65536
)

// Files in the state directory (the node's data dir).
const (
	CertFile        = "member.cert"
	RevocationsFile = "revocations"
	RedeemedFile    = "redeemed"
)

// Membership is the view of one node of a closed swarm: who is a member,
// who is revoked, and this node's own certificate.
type Membership struct {
	v         Verifier
	owner     *Owner
	invite    *Signed
	inviteRaw string
	dir       string
	grace     time.Duration

	mu       sync.Mutex
	self     *Signed
	members  map[peer.ID]Signed
	refused  map[peer.ID]error // verdicts on connected peers: a bad certificate, no handshake protocol
	revPeers map[peer.ID]Signed
	revNonce map[string]Signed
	revOrder []Signed // oldest first
	redeemed map[string]peer.ID
	changed  chan struct{} // closed and replaced on every change
	lastErr  error         // the last refusal a peer sent us

	// conns holds the IDs of each peer's open connections, kept by the
	// host's notifications (under mu, as the verdicts are): a verdict is
	// recorded only on a peer that has one, so one reached after the
	// peer's last disconnect (which forgets it) cannot outlive it. Nil
	// until Attach; then verdicts are always kept.
	conns map[peer.ID]map[string]struct{}

	h        host.Host
	ctx      context.Context
	onNotice func(warning bool, text string)
	// inflight holds the peers a handshake runs with; true when another
	// was asked for meanwhile (a new connection), to run when it ends.
	inflight map[peer.ID]bool
	gossip   *gossip
}

// Option configures a Membership.
type Option func(*Membership) error

// WithOwner makes this node the swarm's owner node: it certifies itself
// and redeems open invites.
func WithOwner(o *Owner) Option {
	return func(m *Membership) error { m.owner = o; return nil }
}

// WithCert sets this node's certificate (from a join token's invite for
// this peer, or stored).
func WithCert(encoded string) Option {
	return func(m *Membership) error {
		c, err := m.v.Verify(encoded, KindCert)
		if err != nil {
			return fmt.Errorf("membership certificate: %w", err)
		}
		m.self = &c
		return nil
	}
}

// WithInvite sets an open invite this node redeems at the owner's node
// for a certificate. It is not needed (nor checked) once the state
// directory holds the certificate it was redeemed for.
func WithInvite(encoded string) Option {
	return func(m *Membership) error { m.inviteRaw = encoded; return nil }
}

// WithStateDir keeps this node's certificate, the revocations and (owner)
// the redeemed invites in dir, so that a restart keeps them.
func WithStateDir(dir string) Option {
	return func(m *Membership) error { m.dir = dir; return nil }
}

// WithGrace sets how long a connected peer may stay without presenting a
// certificate before it is disconnected (default 30 s).
func WithGrace(d time.Duration) Option {
	return func(m *Membership) error {
		if d <= 0 {
			return fmt.Errorf("membership grace %s must be positive", d)
		}
		m.grace = d
		return nil
	}
}

// DefaultGrace is how long a peer may stay connected without a
// certificate.
const DefaultGrace = 30 * time.Second

// New makes the membership of the closed swarm named swarm, owned by
// owner. It loads the state directory when one is given.
func New(swarm string, owner peer.ID, opts ...Option) (*Membership, error) {
	m := &Membership{
		v:        Verifier{Swarm: swarm, Owner: owner},
		grace:    DefaultGrace,
		members:  make(map[peer.ID]Signed),
		refused:  make(map[peer.ID]error),
		revPeers: make(map[peer.ID]Signed),
		revNonce: make(map[string]Signed),
		redeemed: make(map[string]peer.ID),
		changed:  make(chan struct{}),
		inflight: make(map[peer.ID]bool),
	}
	for _, o := range opts {
		if err := o(m); err != nil {
			return nil, err
		}
	}
	if m.owner != nil && (m.owner.ID() != owner || m.owner.Swarm() != swarm) {
		return nil, fmt.Errorf("%w: owner key of %s for swarm %q, want %s for %q", ErrWrongSwarm, m.owner.ID(), m.owner.Swarm(), owner, swarm)
	}
	if m.dir != "" {
		if err := m.load(); err != nil {
			return nil, err
		}
	}
	if m.self == nil && m.inviteRaw != "" {
		i, err := m.v.Verify(m.inviteRaw, KindInvite)
		if err != nil {
			return nil, fmt.Errorf("invite: %w", err)
		}
		m.invite = &i
	}
	return m, nil
}

// Swarm is the swarm's name; Owner its owner's peer ID (the swarm id).
func (m *Membership) Swarm() string  { return m.v.Swarm }
func (m *Membership) Owner() peer.ID { return m.v.Owner }

// Self is this node's certificate, if it has one.
func (m *Membership) Self() (Signed, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.self == nil {
		return Signed{}, false
	}
	return *m.self, true
}

// OnNotice has f told, in one line, what the operator should know: this
// node's certificate or invite refused by a peer (a warning, once per
// reason), an invite redeemed, a revocation applied. Set it before
// Attach; f must not block.
func (m *Membership) OnNotice(f func(warning bool, text string)) {
	m.mu.Lock()
	m.onNotice = f
	m.mu.Unlock()
}

func (m *Membership) notice(warning bool, text string) {
	m.mu.Lock()
	f := m.onNotice
	m.mu.Unlock()
	switch {
	case f != nil:
		f(warning, text)
	case warning:
		log.Warn(text)
	default:
		log.Info(text)
	}
}

// LastRefusal is the last reason a peer gave for refusing our
// certificate or invite (nil for none).
func (m *Membership) LastRefusal() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lastErr
}

// IsMember reports whether p has presented a valid certificate that is
// neither expired nor revoked. This node is a member of itself.
func (m *Membership) IsMember(p peer.ID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.isMemberLocked(p)
}

func (m *Membership) isMemberLocked(p peer.ID) bool {
	if m.h != nil && p == m.h.ID() {
		return true
	}
	c, ok := m.members[p]
	if !ok {
		return false
	}
	if m.v.fresh(c) != nil || m.revokedLocked(c) {
		delete(m.members, p)
		return false
	}
	return true
}

// revokedLocked reports whether c's peer or the invite it came from is
// revoked.
func (m *Membership) revokedLocked(c Signed) bool {
	if _, ok := m.revPeers[c.PeerID()]; ok {
		return true
	}
	if c.Nonce != "" {
		if _, ok := m.revNonce[c.Nonce]; ok {
			return true
		}
	}
	return false
}

// Revoked reports whether p is revoked.
func (m *Membership) Revoked(p peer.ID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.revPeers[p]
	return ok
}

// Roles are the roles of a member's certificate (nil for none or not a
// member).
func (m *Membership) Roles(p peer.ID) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.isMemberLocked(p) {
		return nil
	}
	return m.members[p].Roles
}

// HasRole reports whether p is a member whose certificate grants role.
// This node has every role of its own certificate; the owner's node has
// every role.
func (m *Membership) HasRole(p peer.ID, role string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h != nil && p == m.h.ID() {
		return m.self == nil || m.self.HasRole(role)
	}
	if !m.isMemberLocked(p) {
		return false
	}
	return m.members[p].HasRole(role)
}

// Await waits until p is a member or ctx ends, reporting whether it is.
// It gives up at once on a connected peer already found not to be one
// (it presented a bad certificate, or does not speak the handshake).
func (m *Membership) Await(ctx context.Context, p peer.ID) bool {
	for {
		m.mu.Lock()
		ok, ch := m.isMemberLocked(p), m.changed
		_, no := m.refused[p]
		m.mu.Unlock()
		if ok {
			return true
		}
		if no {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-ch:
		}
	}
}

func (m *Membership) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// refuse records that the connected peer p is not a member, until it
// disconnects (or presents a valid certificate after all).
func (m *Membership) refuse(p peer.ID, why error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.members[p]; ok || !m.keepsLocked(p) {
		return
	}
	if _, ok := m.refused[p]; !ok && len(m.refused) >= MaxMembers {
		return
	}
	m.refused[p] = why
	m.notifyLocked()
}

// accept checks a certificate presented by from and records it.
func (m *Membership) accept(encoded string, from peer.ID) (Signed, error) {
	c, err := m.verifyFrom(encoded, from)
	if err != nil {
		m.refuse(from, err)
		return Signed{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.keepsLocked(from) {
		// Its disconnect came first: the certificate is good, but there
		// is no connection left to admit.
		return c, nil
	}
	delete(m.refused, from)
	if _, ok := m.members[from]; !ok && len(m.members) >= MaxMembers {
		return Signed{}, fmt.Errorf("membership table full (%d peers)", MaxMembers)
	}
	m.members[from] = c
	m.notifyLocked()
	return c, nil
}

func (m *Membership) verifyFrom(encoded string, from peer.ID) (Signed, error) {
	c, err := m.v.Verify(encoded, KindCert)
	if err != nil {
		return Signed{}, err
	}
	if c.PeerID() != from {
		return Signed{}, fmt.Errorf("%w: certificate of %s presented by %s", ErrNotMember, c.Peer, from)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.revokedLocked(c) {
		return Signed{}, fmt.Errorf("membership of %s: %w", from, ErrRevoked)
	}
	return c, nil
}

// keepsLocked reports whether a verdict on p may be kept: p has a
// connection open, or the membership is not attached to a host.
func (m *Membership) keepsLocked(p peer.ID) bool {
	return m.conns == nil || len(m.conns[p]) > 0
}

// connected records an open connection of p.
func (m *Membership) connected(p peer.ID, conn string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.connectedLocked(p, conn)
}

func (m *Membership) connectedLocked(p peer.ID, conn string) {
	if m.conns[p] == nil {
		m.conns[p] = make(map[string]struct{}, 1)
	}
	m.conns[p][conn] = struct{}{}
}

// disconnected records a closed connection of p, and drops what is known
// of p when it was p's last.
func (m *Membership) disconnected(p peer.ID, conn string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.conns[p], conn)
	if len(m.conns[p]) > 0 {
		return
	}
	delete(m.conns, p)
	delete(m.members, p)
	delete(m.refused, p)
}

// Revoke applies an encoded revocation. It reports whether it was new;
// the peers it cuts off are disconnected.
func (m *Membership) Revoke(encoded string) (Signed, bool, error) {
	return m.revoke(encoded, true)
}

// revoke is Revoke; save says whether to append it to the state
// directory (not for what was read from there).
func (m *Membership) revoke(encoded string, save bool) (Signed, bool, error) {
	r, err := m.v.Verify(encoded, KindRevoke)
	if err != nil {
		return Signed{}, false, err
	}
	m.mu.Lock()
	if m.knownLocked(r) {
		m.mu.Unlock()
		return r, false, nil
	}
	if len(m.revOrder) >= MaxRevocations {
		m.mu.Unlock()
		return Signed{}, false, fmt.Errorf("revocation list full (%d)", MaxRevocations)
	}
	m.addLocked(r)
	var cut []peer.ID
	for p, c := range m.members {
		if m.revokedLocked(c) {
			delete(m.members, p)
			cut = append(cut, p)
		}
	}
	if p := r.PeerID(); p != "" {
		cut = append(cut, p)
	}
	m.notifyLocked()
	h := m.h
	m.mu.Unlock()
	if r.Peer != "" {
		m.notice(false, "membership: peer "+r.Peer+" revoked")
	} else {
		m.notice(false, "membership: invite "+r.Nonce+" revoked")
	}
	if save {
		if err := m.appendLine(RevocationsFile, encoded); err != nil {
			log.Warnw("revocation not saved", "err", err)
		}
	}
	if h != nil {
		for _, p := range cut {
			if p != h.ID() {
				_ = h.Network().ClosePeer(p)
			}
		}
	}
	return r, true, nil
}

func (m *Membership) knownLocked(r Signed) bool {
	if p := r.PeerID(); p != "" {
		_, ok := m.revPeers[p]
		return ok
	}
	_, ok := m.revNonce[r.Nonce]
	return ok
}

func (m *Membership) addLocked(r Signed) {
	if p := r.PeerID(); p != "" {
		m.revPeers[p] = r
	} else {
		m.revNonce[r.Nonce] = r
	}
	m.revOrder = append(m.revOrder, r)
}

// Revocations are the known revocations, the newest last, at most n.
func (m *Membership) Revocations(n int) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	rs := m.revOrder[max(0, len(m.revOrder)-n):]
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Encoded
	}
	return out
}

// redeem issues a certificate for p in exchange for an open invite: once
// per invite (the same peer may redeem again, after a restart).
func (m *Membership) redeem(encoded string, p peer.ID) (Signed, error) {
	if m.owner == nil {
		return Signed{}, errors.New("open invites are redeemed at the swarm owner's node: join through it")
	}
	inv, err := m.v.Verify(encoded, KindInvite)
	if err != nil {
		return Signed{}, err
	}
	m.mu.Lock()
	if _, ok := m.revNonce[inv.Nonce]; ok {
		m.mu.Unlock()
		return Signed{}, fmt.Errorf("invite %s: %w", inv.Nonce, ErrRevoked)
	}
	if _, ok := m.revPeers[p]; ok {
		m.mu.Unlock()
		return Signed{}, fmt.Errorf("peer %s: %w", p, ErrRevoked)
	}
	by, used := m.redeemed[inv.Nonce]
	if used && by != p {
		m.mu.Unlock()
		return Signed{}, fmt.Errorf("invite %s was already used by another peer: it admits one", inv.Nonce)
	}
	if !used && len(m.redeemed) >= MaxRedeemed {
		m.mu.Unlock()
		return Signed{}, fmt.Errorf("too many redeemed invites (%d)", MaxRedeemed)
	}
	m.redeemed[inv.Nonce] = p
	m.mu.Unlock()
	var ttl time.Duration
	if inv.Exp != 0 {
		// The certificate lives as long as the invite would have. An
		// invite taken within the clock skew after its end would give a
		// ttl <= 0, which Cert reads as "never": it gets the last second.
		ttl = max(time.Until(inv.Expires()), time.Second)
	}
	c, err := m.owner.Cert(p, inv.Roles, ttl, inv.Nonce)
	if err != nil {
		return Signed{}, err
	}
	if !used {
		if err := m.appendLine(RedeemedFile, inv.Nonce+" "+p.String()); err != nil {
			log.Warnw("redeemed invite not saved", "err", err)
		}
	}
	log.Infow("invite redeemed", "invite", inv.Nonce, "peer", p)
	return c, nil
}

// setSelf adopts a certificate issued to this node.
func (m *Membership) setSelf(c Signed) {
	m.mu.Lock()
	m.self = &c
	m.notifyLocked()
	m.mu.Unlock()
	if m.dir != "" {
		if err := writeFile(filepath.Join(m.dir, CertFile), c.Encoded+"\n"); err != nil {
			log.Warnw("certificate not saved", "err", err)
		}
	}
}

// load reads the state directory: this node's certificate, revocations
// and redeemed invites. Lines that fail to verify are skipped.
func (m *Membership) load() error {
	if m.self == nil {
		b, err := os.ReadFile(filepath.Join(m.dir, CertFile))
		switch {
		case err == nil:
			if c, err := m.v.Verify(string(b), KindCert); err == nil {
				m.self = &c
			} else {
				log.Warnw("stored certificate not used", "err", err)
			}
		case !errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("read certificate: %w", err)
		}
	}
	if err := m.readLines(RevocationsFile, func(l string) {
		if r, err := m.v.Verify(l, KindRevoke); err == nil && !m.knownLocked(r) && len(m.revOrder) < MaxRevocations {
			m.addLocked(r)
		}
	}); err != nil {
		return err
	}
	return m.readLines(RedeemedFile, func(l string) {
		nonce, id, ok := strings.Cut(l, " ")
		if p, err := peer.Decode(id); ok && err == nil && len(m.redeemed) < MaxRedeemed {
			m.redeemed[nonce] = p
		}
	})
}

func (m *Membership) readLines(name string, f func(string)) error {
	file, err := os.Open(filepath.Join(m.dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	sc.Buffer(make([]byte, 0, MaxEncoded+128), MaxEncoded+128)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			f(l)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	return nil
}

// appendLine appends a line to a state file (no state dir: nothing).
func (m *Membership) appendLine(name, line string) error {
	if m.dir == "" {
		return nil
	}
	return AppendLine(filepath.Join(m.dir, name), line)
}

// AppendLine appends line to path (mode 0600).
func AppendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	if _, err := f.WriteString(line + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

func writeFile(path, s string) error { return atomicfile.Write(path, []byte(s), 0o600) }
