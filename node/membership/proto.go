package membership

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// ProtocolID is the handshake: the dialling side sends a Hello, the other
// answers with a Reply, each one JSON object, and both close.
const ProtocolID libp2pproto.ID = "/mtor/member/1.0.0"

// Handshake bounds.
const (
	// MaxMessage bounds a Hello or a Reply.
	MaxMessage = 64 << 10
	// MaxReplyRevocations bounds the revocations a Reply carries.
	MaxReplyRevocations = 12
	// HandshakeTimeout is the deadline of one handshake stream.
	HandshakeTimeout = 10 * time.Second
	sweepEvery       = time.Second
)

// Hello is what a peer presents: its certificate, or an open invite to
// redeem at the owner's node.
type Hello struct {
	Cert   string `json:"cert,omitempty"`
	Invite string `json:"invite,omitempty"`
}

// Reply answers a Hello: the answering node's own certificate, a
// certificate issued for the invite, recent revocations, or why the Hello
// was refused.
type Reply struct {
	Cert        string   `json:"cert,omitempty"`
	Issued      string   `json:"issued,omitempty"`
	Revocations []string `json:"revocations,omitempty"`
	Error       string   `json:"error,omitempty"`
}

// Attach starts membership on h: the owner node certifies itself, the
// handshake protocol is served and run with every peer that connects,
// peers that present no certificate within the grace period are
// disconnected, and the state directory's revocations file is watched
// (mtor revoke appends to it). It stops when ctx ends.
func (m *Membership) Attach(ctx context.Context, h host.Host) error {
	m.mu.Lock()
	m.h, m.ctx = h, ctx
	m.mu.Unlock()
	if m.owner != nil {
		if c, ok := m.Self(); !ok || c.PeerID() != h.ID() {
			c, err := m.owner.Cert(h.ID(), nil, 0, "")
			if err != nil {
				return fmt.Errorf("certify the owner's node: %w", err)
			}
			m.setSelf(c)
		}
	}
	if c, ok := m.Self(); ok && c.PeerID() != h.ID() {
		return fmt.Errorf("%w: the certificate is for peer %s, this node is %s", ErrNotMember, c.Peer, h.ID())
	}
	m.mu.Lock()
	m.conns = make(map[peer.ID]map[string]struct{})
	m.mu.Unlock()
	h.Network().Notify(&network.NotifyBundle{
		ConnectedF: func(_ network.Network, c network.Conn) {
			m.connected(c.RemotePeer(), c.ID())
			m.startHandshake(c.RemotePeer())
		},
		DisconnectedF: func(_ network.Network, c network.Conn) { m.disconnected(c.RemotePeer(), c.ID()) },
	})
	// The connections made before: listed under mu, so that the
	// disconnect of one listed here (which waits for mu) comes after it
	// is recorded, never before.
	m.mu.Lock()
	existing := h.Network().Conns()
	for _, c := range existing {
		m.connectedLocked(c.RemotePeer(), c.ID())
	}
	m.mu.Unlock()
	// Served only now: a hello on a connection not yet listed would be
	// answered but its verdict not kept.
	h.SetStreamHandler(ProtocolID, m.handle)
	for _, c := range existing {
		m.startHandshake(c.RemotePeer())
	}
	go m.sweepLoop(ctx)
	return nil
}

// hello is what this node presents.
func (m *Membership) hello() (Hello, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.self != nil:
		return Hello{Cert: m.self.Encoded}, true
	case m.invite != nil:
		return Hello{Invite: m.invite.Encoded}, true
	}
	return Hello{}, false
}

// startHandshake runs the handshake with p in the background, once at a
// time per peer. Asked for while one runs, it runs again after: the one
// running may be on a connection that has just closed, its verdict then
// not kept, while p is connected again.
func (m *Membership) startHandshake(p peer.ID) {
	m.mu.Lock()
	if m.h == nil || p == m.h.ID() || m.revPeers[p].Encoded != "" {
		m.mu.Unlock()
		return
	}
	if _, running := m.inflight[p]; running {
		m.inflight[p] = true
		m.mu.Unlock()
		return
	}
	m.inflight[p] = false
	ctx := m.ctx
	m.mu.Unlock()
	go func() {
		for {
			if err := m.Handshake(ctx, p); err != nil {
				log.Debugw("membership handshake", "peer", p, "err", err)
			}
			m.mu.Lock()
			again := m.inflight[p] && ctx.Err() == nil && m.revPeers[p].Encoded == ""
			if !again {
				delete(m.inflight, p)
				m.mu.Unlock()
				return
			}
			m.inflight[p] = false
			m.mu.Unlock()
		}
	}()
}

// Handshake presents this node's certificate (or invite) to p and
// records what p answers: its certificate, a certificate issued to us,
// revocations, or a refusal (LastRefusal).
func (m *Membership) Handshake(ctx context.Context, p peer.ID) error {
	hello, ok := m.hello()
	if !ok {
		return errors.New("no certificate or invite to present")
	}
	ctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	// Never dial for a handshake: it is run for a connection that came
	// up, and one that has gone since (closed, revoked) must stay gone.
	sctx := network.WithNoDial(network.WithAllowLimitedConn(ctx, "membership"), "membership handshake")
	s, err := m.h.NewStream(sctx, p, ProtocolID)
	if err != nil {
		// Identify done, and no handshake protocol among the peer's: not
		// a node of a closed swarm (an open node that knows the name).
		if protos, _ := m.h.Peerstore().GetProtocols(p); len(protos) > 0 && !slices.Contains(protos, ProtocolID) {
			m.refuse(p, ErrNotMember)
		}
		return fmt.Errorf("open membership stream: %w", err)
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(HandshakeTimeout))
	if err := json.NewEncoder(s).Encode(hello); err != nil {
		s.Reset()
		return fmt.Errorf("send hello: %w", err)
	}
	_ = s.CloseWrite()
	var r Reply
	if err := readJSON(s, &r); err != nil {
		s.Reset()
		return fmt.Errorf("read reply: %w", err)
	}
	m.applyRevocations(r.Revocations)
	if r.Issued != "" {
		c, err := m.v.Verify(r.Issued, KindCert)
		if err != nil || c.PeerID() != m.h.ID() {
			return fmt.Errorf("issued certificate refused: %v", err)
		}
		m.setSelf(c)
		log.Infow("invite redeemed: this node is a member", "by", p)
		m.notice(false, fmt.Sprintf("membership: invite redeemed at the owner's node %s; this node is a member", p))
		// Everyone we are connected to learns it now.
		for _, q := range m.h.Network().Peers() {
			if q != p {
				m.startHandshake(q)
			}
		}
	}
	if r.Error != "" {
		err := fmt.Errorf("refused by %s: %s", p, r.Error)
		m.mu.Lock()
		again := m.lastErr != nil && strings.HasSuffix(m.lastErr.Error(), r.Error)
		m.lastErr = err
		m.mu.Unlock()
		if !again {
			m.notice(true, "membership "+err.Error())
		}
		return err
	}
	if r.Cert != "" {
		if _, err := m.accept(r.Cert, p); err != nil {
			return fmt.Errorf("certificate of %s: %w", p, err)
		}
	}
	return nil
}

// handle answers a peer's Hello.
func (m *Membership) handle(s network.Stream) {
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(HandshakeTimeout))
	p := s.Conn().RemotePeer()
	var hello Hello
	if err := readJSON(s, &hello); err != nil {
		log.Debugw("bad membership hello", "peer", p, "err", err)
		s.Reset()
		return
	}
	var r Reply
	if self, ok := m.Self(); ok {
		r.Cert = self.Encoded
	}
	r.Revocations = m.Revocations(MaxReplyRevocations)
	switch {
	case hello.Cert != "":
		if _, err := m.accept(hello.Cert, p); err != nil {
			r.Error = err.Error()
		}
	case hello.Invite != "":
		c, err := m.redeem(hello.Invite, p)
		if err != nil {
			r.Error = err.Error()
			break
		}
		r.Issued = c.Encoded
		if _, err := m.accept(c.Encoded, p); err != nil {
			r.Error = err.Error()
		}
	default:
		r.Error = "hello without a certificate or invite"
	}
	if r.Error != "" {
		r.Cert = "" // a non-member learns nothing
		log.Debugw("membership refused", "peer", p, "reason", r.Error)
	}
	// The reply carries our certificate: the peer needs no handshake of
	// ours to learn it.
	if err := json.NewEncoder(s).Encode(r); err != nil {
		s.Reset()
	}
}

// readJSON reads one JSON object of at most MaxMessage bytes.
func readJSON(r io.Reader, v any) error {
	dec := json.NewDecoder(io.LimitReader(r, MaxMessage))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (m *Membership) applyRevocations(rs []string) {
	for _, r := range rs[:min(len(rs), MaxReplyRevocations)] {
		if _, isNew, err := m.Revoke(r); err != nil {
			log.Debugw("revocation refused", "err", err)
		} else if isNew {
			m.publish(r)
		}
	}
}

// sweepLoop disconnects peers that stayed connected for the grace period
// without presenting a certificate, and applies revocations appended to
// the state directory by mtor revoke.
func (m *Membership) sweepLoop(ctx context.Context) {
	t := time.NewTicker(sweepEvery)
	defer t.Stop()
	var size int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, p := range m.h.Network().Peers() {
			if m.IsMember(p) {
				continue
			}
			var oldest time.Time
			for _, c := range m.h.Network().ConnsToPeer(p) {
				if o := c.Stat().Opened; oldest.IsZero() || o.Before(oldest) {
					oldest = o
				}
			}
			if !oldest.IsZero() && time.Since(oldest) > m.grace {
				log.Infow("disconnecting a peer without a membership certificate", "peer", p)
				_ = m.h.Network().ClosePeer(p)
			}
		}
		if m.dir != "" {
			size = m.watchRevocations(size)
		}
	}
}

// watchRevocations applies the revocations file when it grew.
func (m *Membership) watchRevocations(size int64) int64 {
	fi, err := os.Stat(filepath.Join(m.dir, RevocationsFile))
	if err != nil || fi.Size() == size {
		return size
	}
	_ = m.readLines(RevocationsFile, func(l string) {
		if _, isNew, err := m.revoke(l, false); err == nil && isNew {
			m.publish(l)
		}
	})
	return fi.Size()
}

// Gater is the connection gater of a closed swarm: revoked peers are
// neither dialled nor accepted. Other peers connect, and have a grace
// period to present a certificate.
func (m *Membership) Gater() Gater { return Gater{m} }

// Gater implements libp2p's connmgr.ConnectionGater.
type Gater struct{ m *Membership }

func (g Gater) InterceptPeerDial(p peer.ID) bool { return !g.m.Revoked(p) }

func (g Gater) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }

func (g Gater) InterceptAccept(network.ConnMultiaddrs) bool { return true }

func (g Gater) InterceptSecured(_ network.Direction, p peer.ID, _ network.ConnMultiaddrs) bool {
	if g.m.Revoked(p) {
		log.Debugw("connection of a revoked peer refused", "peer", p)
		return false
	}
	return true
}

func (g Gater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }
