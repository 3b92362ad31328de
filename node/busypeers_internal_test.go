package node

import (
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

func TestBusyPeersCountsStreams(t *testing.T) {
	for _, tc := range []struct {
		name   string
		deltas []int
		busy   bool
	}{
		{"none", nil, false},
		{"one open", []int{1}, true},
		{"one answered", []int{1, -1}, false},
		{"two open, one answered", []int{1, 1, -1}, true},
		{"both answered", []int{1, 1, -1, -1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBusyPeers()
			for _, d := range tc.deltas {
				b.add("p", d)
			}
			if got := b.has("p"); got != tc.busy {
				t.Fatalf("busy %v, want %v", got, tc.busy)
			}
			if b.has(peer.ID("other")) {
				t.Fatal("another peer is busy")
			}
			if !tc.busy && len(b.n) != 0 {
				t.Fatalf("%d peers kept with no stream open", len(b.n))
			}
		})
	}
}
