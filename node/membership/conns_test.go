package membership

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// transports are the default transports, for the tests that run over
// each.
var transports = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}

// onEachTransport runs test once on each transport, as subtests.
func onEachTransport(t *testing.T, test func(t *testing.T, listen string)) {
	for _, listen := range transports {
		t.Run(listen, func(t *testing.T) { test(t, listen) })
	}
}

// newHost is a host listening on listen, closed at the end.
func newHost(tb testing.TB, listen string, opts ...libp2p.Option) host.Host {
	tb.Helper()
	h, err := libp2p.New(append(opts, libp2p.ListenAddrStrings(listen))...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { h.Close() })
	return h
}

// attached is a host listening on listen with a membership of o's swarm
// attached, and its connection gater: the owner's node when owner is
// set, else a member's.
func attached(tb testing.TB, o *Owner, listen string, owner bool) (*Membership, host.Host) {
	tb.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		tb.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	opt := WithOwner(o)
	if !owner {
		c, err := o.Cert(id, nil, time.Hour, "")
		if err != nil {
			tb.Fatal(err)
		}
		opt = WithCert(c.Encoded)
	}
	m, err := New(o.Swarm(), o.ID(), opt)
	if err != nil {
		tb.Fatal(err)
	}
	h := newHost(tb, listen, libp2p.Identity(key), libp2p.ConnectionGater(m.Gater()))
	if err := m.Attach(tb.Context(), h); err != nil {
		tb.Fatal(err)
	}
	return m, h
}

// admits waits until m holds p's certificate.
func admits(t *testing.T, m *Membership, p peer.ID, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if !m.Await(ctx, p) {
		t.Fatalf("%s: %s not admitted", what, p)
	}
}

// waitFor polls f until it holds, for at most 10 s.
func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (m *Membership) holds(p peer.ID) (member, refused bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, member = m.members[p]
	_, refused = m.refused[p]
	return member, refused
}

// A verdict is kept while its peer has a connection, and only then: one
// reached after the peer's last disconnect (a handshake that finished a
// moment late) would hold one of the bounded places, and speak for a
// peer that is gone, until the peer came and went again. Over TCP and
// QUIC, the default transports.
func TestVerdictKeptOnlyWhileConnected(t *testing.T) {
	onEachTransport(t, func(t *testing.T, listen string) {
		o := newOwner(t, "team")
		a, ha := attached(t, o, listen, true)
		_, hb := attached(t, o, listen, false)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		if err := hb.Connect(ctx, peer.AddrInfo{ID: ha.ID(), Addrs: ha.Addrs()}); err != nil {
			t.Fatal(err)
		}
		admits(t, a, hb.ID(), "the owner's node")

		if err := hb.Network().ClosePeer(ha.ID()); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the disconnect forgets the member", func() bool { m, _ := a.holds(hb.ID()); return !m })
		c, err := o.Cert(hb.ID(), nil, time.Hour, "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.accept(c.Encoded, hb.ID()); err != nil {
			t.Fatalf("a late, valid certificate: %v", err)
		}
		a.refuse(hb.ID(), ErrNotMember)
		never := newPeer(t)
		a.refuse(never, ErrNotMember)
		if m, r := a.holds(hb.ID()); m || r {
			t.Fatalf("verdicts on a peer gone: member %v, refused %v; want none kept", m, r)
		}
		if _, r := a.holds(never); r {
			t.Fatal("the refusal of a peer never connected was kept")
		}

		// It comes back: admitted again.
		if err := hb.Connect(ctx, peer.AddrInfo{ID: ha.ID(), Addrs: ha.Addrs()}); err != nil {
			t.Fatal(err)
		}
		admits(t, a, hb.ID(), "back again")
	})
}

// Connections made before Attach count as connections: their peers'
// verdicts are kept.
func TestConnectionsBeforeAttachCount(t *testing.T) {
	onEachTransport(t, testConnectionsBeforeAttachCount)
}

func testConnectionsBeforeAttachCount(t *testing.T, listen string) {
	o := newOwner(t, "team")
	ha := newHost(t, listen)
	_, hb := attached(t, o, listen, false)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := hb.Connect(ctx, peer.AddrInfo{ID: ha.ID(), Addrs: ha.Addrs()}); err != nil {
		t.Fatal(err)
	}
	a, err := New(o.Swarm(), o.ID(), WithOwner(o))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Attach(t.Context(), ha); err != nil {
		t.Fatal(err)
	}
	admits(t, a, hb.ID(), "a peer connected before the owner's node attached")
}

// A handshake asked for while one with the same peer runs (a new
// connection, the old one closing under it) runs after it, rather than
// being dropped: the running one's verdict may come after its connection
// closed, and is then not kept.
func TestHandshakeAskedForWhileOneRunsRunsAgain(t *testing.T) {
	onEachTransport(t, testHandshakeAskedForWhileOneRunsRunsAgain)
}

func testHandshakeAskedForWhileOneRunsRunsAgain(t *testing.T, listen string) {
	o := newOwner(t, "team")
	a, ha := attached(t, o, listen, true)
	hb := newHost(t, listen)
	calls := make(chan struct{}, 4)
	release := make(chan struct{})
	hb.SetStreamHandler(ProtocolID, func(s network.Stream) {
		calls <- struct{}{}
		<-release
		_ = s.Reset()
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := ha.Connect(ctx, peer.AddrInfo{ID: hb.ID(), Addrs: hb.Addrs()}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-calls:
	case <-ctx.Done():
		t.Fatal("no handshake on connect")
	}
	a.startHandshake(hb.ID())
	close(release)
	select {
	case <-calls:
	case <-ctx.Done():
		t.Fatal("the handshake asked for while one ran never ran")
	}
}
