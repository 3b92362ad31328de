package node

import (
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"
)

// busyPeers counts, per peer, the query streams this node's worker is
// answering (worker.WithServing), so that a gossip-link repair, which
// closes a peer's connections, waits for them as for the router's own
// queries (discovery.WithBusy).
type busyPeers struct {
	mu sync.Mutex
	n  map[peer.ID]int
}

func newBusyPeers() *busyPeers { return &busyPeers{n: map[peer.ID]int{}} }

// add counts delta more streams of p (+1 as one starts, -1 as it ends).
func (b *busyPeers) add(p peer.ID, delta int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.n[p] += delta; b.n[p] <= 0 {
		delete(b.n, p)
	}
}

// has reports whether a stream of p is being answered.
func (b *busyPeers) has(p peer.ID) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n[p] > 0
}
