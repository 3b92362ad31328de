package node

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/dupconn"
)

// Two nodes on TCP and QUIC that dial each other at once hold two
// connections; the pruners leave one, and announcements still flow both
// ways over gossipsub. Real nodes; only the pruner's pace is quickened.
func TestNodesCloseRedundantConnections(t *testing.T) {
	start := func(model string) *Node {
		key, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		n, err := New(context.Background(), WithIdentity(key), WithMDNS(false),
			WithListenAddrs("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"),
			WithAnnounceInterval(200*time.Millisecond), WithBackends(demo.New(model)),
			withDupConn(dupconn.WithGrace(0), dupconn.WithInterval(100*time.Millisecond)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	a, b := start("ma"), start("mb")
	addr := func(h host.Host, proto int) []ma.Multiaddr {
		for _, x := range h.Addrs() {
			if _, err := x.ValueForProtocol(proto); err == nil {
				return []ma.Multiaddr{x}
			}
		}
		t.Fatalf("no address with protocol %d in %v", proto, h.Addrs())
		return nil
	}
	conns := func(x, y *Node) int { return len(x.h.Network().ConnsToPeer(y.h.ID())) }
	// The pruners may close a duplicate at once, so look for one right
	// after the dials, through the count of connections ever opened.
	opened := make(chan struct{}, 64)
	a.h.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		if c.RemotePeer() == b.h.ID() {
			select {
			case opened <- struct{}{}:
			default:
			}
		}
	}})
	// Two connections opened within a second of the dials, else close
	// and try again.
	race := func() bool {
		go func() { _ = b.h.Connect(t.Context(), peer.AddrInfo{ID: a.h.ID(), Addrs: addr(a.h, ma.P_TCP)}) }()
		_ = a.h.Connect(t.Context(), peer.AddrInfo{ID: b.h.ID(), Addrs: addr(b.h, ma.P_QUIC_V1)})
		deadline := time.After(time.Second)
		for n := 0; n < 2; n++ {
			select {
			case <-opened:
			case <-deadline:
				return false
			}
		}
		return true
	}
	// A race whose two connections each carry one end's gossipsub stream
	// keeps both (node/dupconn: gossipsub's streams are not expendable);
	// try again until the pruners leave one.
	pruned := false
	for try := 0; try < 20 && !pruned; try++ {
		if race() {
			deadline := time.Now().Add(3 * time.Second)
			for !pruned && time.Now().Before(deadline) {
				pruned = conns(a, b) == 1 && conns(b, a) == 1
				time.Sleep(50 * time.Millisecond)
			}
		}
		if !pruned {
			_ = a.h.Network().ClosePeer(b.h.ID())
			time.Sleep(200 * time.Millisecond)
		}
		for len(opened) > 0 {
			<-opened
		}
	}
	if !pruned {
		t.Fatal("no duplicate connection closed in 20 simultaneous dials")
	}
	// By the lower peer ID's end alone.
	lo, hi := a, b
	if hi.h.ID() < lo.h.ID() {
		lo, hi = hi, lo
	}
	if lo.prune.Closed() == 0 || hi.prune.Closed() != 0 {
		t.Fatalf("closed by the lower peer ID's end %d, the higher's %d; want some, none", lo.prune.Closed(), hi.prune.Closed())
	}
	// What the node tells (/v1/id's redundant_closed).
	if lc, hc := lo.State().RedundantClosed, hi.State().RedundantClosed; lc != lo.prune.Closed() || hc != 0 {
		t.Fatalf("State().RedundantClosed %d and %d, want %d and 0", lc, hc, lo.prune.Closed())
	}
	closedAt := time.Now()
	fresh := func(x, y *Node) bool {
		for _, e := range x.disc.Table().Snapshot() {
			if e.Peer == y.h.ID() && e.Received.After(closedAt) {
				return true
			}
		}
		return false
	}
	waitFor(t, 15*time.Second, "b's announcements at a", func() bool { return fresh(a, b) })
	waitFor(t, 15*time.Second, "a's announcements at b", func() bool { return fresh(b, a) })
	if st := a.State(); st.Connections != st.ConnectedPeers || !slices.Contains(a.h.Network().Peers(), b.h.ID()) {
		t.Fatalf("a: %d connections for %d peers, want one each", st.Connections, st.ConnectedPeers)
	}
}

// maxConnsPerPeer is libp2p's default of connections one peer may hold to
// a host (the resource manager's per-peer Conns, which mtor keeps).
const maxConnsPerPeer = 8

// TestPeerPilingConnectionsIsBounded: a stranger dials a node from 12
// hosts that share one key, one peer ID piling up connections. The node
// holds at most libp2p's 8 of them. Where the node has the lower peer ID
// its pruner decides, and closes all but one; where the stranger has, it
// keeps what it got, within the 8, and the node's pruner leaves them to it
// as it would to an honest peer (both ends closing could leave none).
func TestPeerPilingConnectionsIsBounded(t *testing.T) {
	for _, tc := range []struct {
		name        string
		nodeDecides bool
	}{{"node has the lower ID", true}, {"stranger has the lower ID", false}} {
		t.Run(tc.name, func(t *testing.T) {
			nkey, _, err := crypto.GenerateEd25519Key(nil)
			if err != nil {
				t.Fatal(err)
			}
			n, err := New(context.Background(), WithIdentity(nkey), WithMDNS(false), WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
				WithBackends(demo.New("m")),
				withDupConn(dupconn.WithGrace(0), dupconn.WithInterval(100*time.Millisecond)))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { n.Close() })
			var key crypto.PrivKey
			var stranger peer.ID
			for key == nil || (n.h.ID() < stranger) != tc.nodeDecides {
				if key, _, err = crypto.GenerateEd25519Key(nil); err != nil {
					t.Fatal(err)
				}
				if stranger, err = peer.IDFromPrivateKey(key); err != nil {
					t.Fatal(err)
				}
			}
			target := peer.AddrInfo{ID: n.h.ID(), Addrs: n.h.Addrs()}
			dialled := 0
			for range 12 {
				h, err := libp2p.New(libp2p.Identity(key), libp2p.NoListenAddrs, libp2p.Transport(tcp.NewTCPTransport))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { h.Close() })
				if h.Connect(t.Context(), target) == nil {
					dialled++
				}
			}
			conns := func() int { return len(n.h.Network().ConnsToPeer(stranger)) }
			if got := conns(); got > maxConnsPerPeer || got == 0 || dialled == 0 {
				t.Fatalf("the node holds %d connections of the stranger (%d dials succeeded), want 1 to %d", got, dialled, maxConnsPerPeer)
			}
			if tc.nodeDecides {
				waitFor(t, 10*time.Second, "one connection left of the stranger's", func() bool { return conns() == 1 })
				if c := n.State().RedundantClosed; c == 0 {
					t.Fatal("the node closed none of the stranger's connections")
				}
				return
			}
			// Ten sweeps: the node closes none, and the bound holds.
			time.Sleep(time.Second)
			if got, c := conns(), n.State().RedundantClosed; got == 0 || got > maxConnsPerPeer || c != 0 {
				t.Fatalf("after its sweeps the node holds %d of the stranger's connections and closed %d; want 1 to %d, none closed", got, c, maxConnsPerPeer)
			}
		})
	}
}
