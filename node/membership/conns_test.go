package membership

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

func newHost(t *testing.T, listen string) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings(listen))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// attached is a membership of o's swarm attached to a fresh host.
func attached(t *testing.T, o *Owner, listen string, owner bool) (*Membership, host.Host) {
	t.Helper()
	h := newHost(t, listen)
	var opts []Option
	if owner {
		opts = append(opts, WithOwner(o))
	} else {
		c, err := o.Cert(h.ID(), nil, time.Hour, "")
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, WithCert(c.Encoded))
	}
	m, err := New(o.Swarm(), o.ID(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Attach(t.Context(), h); err != nil {
		t.Fatal(err)
	}
	return m, h
}

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
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) {
			o := newOwner(t, "team")
			a, ha := attached(t, o, listen, true)
			_, hb := attached(t, o, listen, false)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			if err := hb.Connect(ctx, peer.AddrInfo{ID: ha.ID(), Addrs: ha.Addrs()}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "the owner's node admits the member", func() bool { return a.IsMember(hb.ID()) })

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
			waitFor(t, "the member is admitted again", func() bool { return a.IsMember(hb.ID()) })
		})
	}
}

// Connections made before Attach count as connections: their peers'
// verdicts are kept.
func TestConnectionsBeforeAttachCount(t *testing.T) {
	o := newOwner(t, "team")
	ha := newHost(t, "/ip4/127.0.0.1/tcp/0")
	_, hb := attached(t, o, "/ip4/127.0.0.1/tcp/0", false)
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
	waitFor(t, "the owner's node admits a peer connected before it attached", func() bool { return a.IsMember(hb.ID()) })
}

// A handshake asked for while one with the same peer runs (a new
// connection, the old one closing under it) runs after it, rather than
// being dropped: the running one's verdict may come after its connection
// closed, and is then not kept.
func TestHandshakeAskedForWhileOneRunsRunsAgain(t *testing.T) {
	o := newOwner(t, "team")
	a, ha := attached(t, o, "/ip4/127.0.0.1/tcp/0", true)
	hb := newHost(t, "/ip4/127.0.0.1/tcp/0")
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
