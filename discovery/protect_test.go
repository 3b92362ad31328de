package discovery

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/protocol"
)

// knownConns waits until the connection manager knows every connection
// h's swarm holds to each of peers (at least one), and returns them. The
// manager learns of a connection after the swarm does, and a trim closes
// only those it knows: one it has not seen yet (a second dial, TCP 30 ms
// after QUIC, finishing on a loaded machine) would keep its peer
// connected through the trim.
func knownConns(t *testing.T, cm *connmgr.BasicConnMgr, h host.Host, peers []host.Host) map[peer.ID][]network.Conn {
	t.Helper()
	known := func() map[peer.ID][]network.Conn {
		m := make(map[peer.ID][]network.Conn, len(peers))
		for _, p := range peers {
			cs := h.Network().ConnsToPeer(p.ID())
			ti := cm.GetTagInfo(p.ID())
			if len(cs) == 0 || ti == nil || len(ti.Conns) != len(cs) {
				return nil
			}
			for _, c := range cs {
				if _, ok := ti.Conns[c.RemoteMultiaddr().String()]; !ok {
					return nil
				}
			}
			m[p.ID()] = cs
		}
		return m
	}
	for deadline := time.Now().Add(waitLimit); ; time.Sleep(10 * time.Millisecond) {
		if m := known(); m != nil {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatal("the connection manager never learned every connection the swarm holds")
		}
	}
}

// The connection manager's trimming does not empty the view: the peers
// the table holds keep their connections (and so their entries), while a
// connected peer that is not in the table is trimmed. Before, a view node
// past the manager's high water lost workers from its table at each trim.
func TestTrimKeepsTheTable(t *testing.T) {
	cm, err := connmgr.NewConnManager(1, 2, connmgr.WithGracePeriod(0))
	if err != nil {
		t.Fatal(err)
	}
	hv, err := libp2p.New(libp2p.ListenAddrStrings(tcpAndQUIC...), libp2p.ConnectionManager(cm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hv.Close() })
	view := newDiscovery(t, hv)
	const n = 4
	workers := make([]host.Host, n)
	for i := range n {
		workers[i] = newHost(t)
		d := newDiscovery(t, workers[i], WithBootstrap([]peer.AddrInfo{info(hv)}))
		heartbeat(t, d, fmt.Sprintf("model-%d", i), 300*time.Millisecond)
	}
	// Peers connected to the view node that announce nothing: the trim
	// leaves the low water (1) of unprotected connections, so two.
	// Each dials one address, so holds one connection, and the trim
	// closes one of the two (see knownConns).
	strangers := []host.Host{newHost(t), newHost(t)}
	quic := peer.AddrInfo{ID: hv.ID(), Addrs: ma.FilterAddrs(hv.Addrs(), func(a ma.Multiaddr) bool {
		_, err := a.ValueForProtocol(ma.P_QUIC_V1)
		return err == nil
	})}
	for _, s := range strangers {
		if err := s.Connect(context.Background(), quic); err != nil {
			t.Fatal(err)
		}
	}
	knownConns(t, cm, hv, strangers)
	waitTable(t, view, "the view to hold every worker", func(es []Entry) bool { return len(es) == n })
	// The protections follow the table's events, asynchronously.
	deadline := time.Now().Add(waitLimit)
	for _, w := range workers {
		for !cm.IsProtected(w.ID(), tableTag) {
			if time.Now().After(deadline) {
				t.Fatalf("worker %s in the table but not protected", w.ID())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	cm.TrimOpenConns(context.Background())
	for i, w := range workers {
		if hv.Network().Connectedness(w.ID()) != network.Connected {
			t.Errorf("worker %d's connection was trimmed", i)
		}
		if _, ok := view.Table().Get(w.ID()); !ok {
			t.Errorf("worker %d left the table at the trim", i)
		}
	}
	if hv.Network().Connectedness(strangers[0].ID()) == network.Connected && hv.Network().Connectedness(strangers[1].ID()) == network.Connected {
		t.Error("no peer outside the table was trimmed: the trim did not run")
	}

	// A worker that leaves the table loses its protection.
	if err := workers[0].Close(); err != nil {
		t.Fatal(err)
	}
	waitTable(t, view, "the closed worker to leave", func(es []Entry) bool { return len(es) == n-1 })
	for deadline := time.Now().Add(waitLimit); cm.IsProtected(workers[0].ID(), tableTag); {
		if time.Now().After(deadline) {
			t.Fatal("a worker gone from the table is still protected")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTrimKeepsFollowers: a worker's connection manager trims the
// connections of its DHT neighbours before those of the peers that follow
// its model (subscribed to the model's topic: the routers of its model),
// and a follower that leaves the topic is worth no more than the others.
func TestTrimKeepsFollowers(t *testing.T) {
	const followers, strangers = 3, 3
	cm, err := connmgr.NewConnManager(followers, followers+1, connmgr.WithGracePeriod(0))
	if err != nil {
		t.Fatal(err)
	}
	hw, err := libp2p.New(libp2p.ListenAddrStrings(tcpAndQUIC...), libp2p.ConnectionManager(cm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hw.Close() })
	w := newDiscovery(t, hw, WithSwarmView(false), WithOnTopicPeerJoin(func(peer.ID) {}))
	heartbeat(t, w, "model-f", 300*time.Millisecond)

	deadline := time.Now().Add(waitLimit)
	var fs []*Discovery
	var fh []host.Host
	for range followers {
		h := newHost(t)
		fs = append(fs, newDiscovery(t, h, WithSwarmView(false), WithWatch("model-f"), WithBootstrap([]peer.AddrInfo{info(hw)}), WithDHTMode(dht.ModeClient)))
		fh = append(fh, h)
	}
	var sh []host.Host
	for range strangers {
		h := newHost(t)
		newDiscovery(t, h, WithSwarmView(false), WithBootstrap([]peer.AddrInfo{info(hw)}), WithDHTMode(dht.ModeClient))
		sh = append(sh, h)
	}
	// The followers and strangers are DHT clients: a DHT server protects
	// the peers of its two farthest buckets (three in four random IDs), and
	// the trim keeps the low water of the unprotected ones, so chance would
	// decide whether anything is trimmed. The strangers must be connected
	// before their tags are looked at.
	knownConns(t, cm, hw, sh)
	tag := "mtor-follower:" + protocol.ModelTopic(testSwarm, "model-f")
	for _, h := range fh {
		for cm.GetTagInfo(h.ID()) == nil || cm.GetTagInfo(h.ID()).Tags[tag] != followerValue {
			if time.Now().After(deadline) {
				t.Fatalf("follower %s not tagged: %+v", h.ID(), cm.GetTagInfo(h.ID()))
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for _, h := range sh {
		if ti := cm.GetTagInfo(h.ID()); ti != nil && ti.Tags[tag] != 0 {
			t.Fatalf("stranger %s tagged as a follower", h.ID())
		}
	}

	// Gossipsub protects the peers of its meshes, which at this size are
	// all of them. The test is of the order the trim takes among the
	// rest, so it lifts those protections (no graft comes in the moment
	// before the trim: every peer is in them already).
	all := append(append([]host.Host{}, fh...), sh...)
	for _, h := range all {
		for _, topic := range w.ps.GetTopics() {
			cm.Unprotect(h.ID(), "pubsub:"+topic)
		}
		if cm.IsProtected(h.ID(), "") {
			t.Fatalf("peer %s protected by more than gossipsub", h.ID())
		}
	}
	// The trim closes the connections of the least valued peers first,
	// down to the low water (the followers' count) of connections: every
	// stranger's. A follower goes too only where the followers hold more
	// connections than that (two crossed dials of one peer), one follower
	// per connection over. The trim is judged by the connections the
	// manager knew when it ran, not by later dials.
	conns := knownConns(t, cm, hw, all)
	followerConns := 0
	for _, h := range fh {
		followerConns += len(conns[h.ID()])
	}
	cm.TrimOpenConns(context.Background())
	allClosed := func(cs []network.Conn) bool {
		for _, c := range cs {
			if !c.IsClosed() {
				return false
			}
		}
		return true
	}
	for i, h := range sh {
		// A closed connection reports it once its transport has shut
		// down, which may come a moment after the trim returns.
		for end := time.Now().Add(2 * time.Second); !allClosed(conns[h.ID()]) && time.Now().Before(end); {
			time.Sleep(10 * time.Millisecond)
		}
		if !allClosed(conns[h.ID()]) {
			t.Errorf("stranger %d's connection was kept: %+v", i, cm.GetTagInfo(h.ID()))
		}
	}
	trimmed := 0
	for _, h := range fh {
		if allClosed(conns[h.ID()]) {
			trimmed++
		}
	}
	if over := followerConns - followers; trimmed > over {
		t.Errorf("%d followers' connections trimmed, with %d connections over the low water", trimmed, over)
	}

	// A follower that stops following loses its tag.
	if err := fs[0].Close(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(waitLimit); ; time.Sleep(10 * time.Millisecond) {
		if ti := cm.GetTagInfo(fh[0].ID()); ti == nil || ti.Tags[tag] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a peer that left the topic is still tagged as a follower")
		}
	}
}
