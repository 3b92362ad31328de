package discovery

import (
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
)

// suspects records the connections WithSuspect is handed, by peer.
type suspects struct {
	mu sync.Mutex
	n  map[peer.ID]int
}

func (s *suspects) suspect(c network.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n[c.RemotePeer()]++
}

func (s *suspects) of(p peer.ID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n[p]
}

// A table peer whose ping fails has its connections suspected; when most
// pings of a round fail, none are: that says more about this node than
// about its peers. On QUIC, where a vanished peer's connection stays open.
func TestFailedPingsSuspectConnections(t *testing.T) {
	rec := &suspects{n: map[peer.ID]int{}}
	obs := newHostOn(t, quicOnly)
	view := newDiscovery(t, obs, WithPingInterval(100*time.Millisecond), WithSuspect(rec.suspect))
	boot := WithBootstrap([]peer.AddrInfo{info(obs)})
	var peers []peer.ID
	var hosts []*Discovery
	for range 4 {
		w := newDiscovery(t, newHostOn(t, quicOnly), boot, WithSwarmView(false))
		heartbeat(t, w, "m", 200*time.Millisecond)
		peers, hosts = append(peers, w.h.ID()), append(hosts, w)
	}
	waitTable(t, view, "the view to hold the 4 workers", func(es []Entry) bool { return len(es) == 4 })

	// One of four stops answering pings: it alone is suspected.
	hosts[0].h.RemoveStreamHandler(ping.ID)
	deadline := time.Now().Add(waitLimit)
	for rec.of(peers[0]) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the peer whose ping fails was never suspected")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, p := range peers[1:] {
		if n := rec.of(p); n != 0 {
			t.Fatalf("a peer that answers its pings was suspected %d times", n)
		}
	}

	// All four stop: most of each round fails, and nobody is suspected
	// any more. A round under way as the handlers go may still end with
	// the first peer alone failing: counted from the rounds after it.
	for _, w := range hosts[1:] {
		w.h.RemoveStreamHandler(ping.ID)
	}
	time.Sleep(300 * time.Millisecond)
	before := make([]int, len(peers))
	for i, p := range peers {
		before[i] = rec.of(p)
	}
	time.Sleep(time.Second) // about 10 rounds, each failing whole
	for i, p := range peers {
		if n := rec.of(p) - before[i]; n != 0 {
			t.Fatalf("peer %d suspected %d times in rounds where every ping failed", i, n)
		}
	}
}
