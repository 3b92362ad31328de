package node_test

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/p2p/protocol/ping"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// A table peer whose ping fails has its connections probed and, when it
// does not answer, closed, so that it leaves the table at once. On QUIC a
// peer that vanished (killed, frozen, its network gone) otherwise stays
// connected, and in every table, until the connection's idle timeout (30
// s). The worker here stands in for such a peer: its ping handler is
// gone, its connection is not.
func TestFailedPingClosesAVanishedPeer(t *testing.T) {
	s := swarmtest.New(t, swarmtest.QUIC(), swarmtest.Workers(1),
		swarmtest.NodeOptions(node.WithDiscoveryOptions(discovery.WithPingInterval(300*time.Millisecond))))
	boot, w := s.Bootstrap, s.Workers[0]
	events, cancel := boot.Discovery().Table().Subscribe(64)
	defer cancel()
	w.Host().RemoveStreamHandler(ping.ID)
	start := time.Now()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Kind != discovery.Leave || ev.Peer != w.ID() {
				continue
			}
			if ev.Reason != discovery.ReasonDisconnected {
				t.Fatalf("the worker left the table: %s, want %s", ev.Reason, discovery.ReasonDisconnected)
			}
			t.Logf("out of the bootstrap's table %s after its pings stopped", time.Since(start).Round(time.Millisecond))
			return
		case <-deadline:
			t.Fatal("a worker that answers no ping is still in the bootstrap's table after 15 s")
		}
	}
}
