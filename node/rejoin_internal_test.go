package node

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
)

// A join peer lost while the node keeps other peers is dialled again:
// when it comes back (same key, same address) the node is connected to
// it within seconds. The join peer here is a bare host, so nothing on its
// side dials the node, and the node's other peer keeps its DHT's routing
// table from emptying (the DHT dials its bootstrap peers only then).
func TestLostJoinPeerIsDialledAgain(t *testing.T) {
	key, listen := restartableIdentity(t)
	bare := func() host.Host {
		h, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings(listen))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		return h
	}
	joinPeer := bare()
	other := startTestNode(t)
	n := startTestNode(t, WithJoin(listen+"/p2p/"+joinPeer.ID().String()), WithJoin(other.JoinLine()))
	connected := func(h host.Host) func() bool {
		return func() bool { return n.Host().Network().Connectedness(h.ID()) == network.Connected }
	}
	waitFor(t, 10*time.Second, "joined both", func() bool { return connected(joinPeer)() && connected(other.Host())() })
	joinPeer.Close()
	waitFor(t, 5*time.Second, "the join peer's loss seen", func() bool { return !connected(joinPeer)() })
	// Past the first redials, which fail: the node must keep trying.
	time.Sleep(3 * time.Second)
	if !connected(other.Host())() {
		t.Fatal("the node lost its other peer too: it would redial as a lone node, which is not the case tested")
	}
	back := bare()
	took := waitFor(t, 15*time.Second, "connected to the join peer back", connected(back))
	t.Logf("connected to the join peer %s after it came back", took.Round(time.Millisecond))
}
