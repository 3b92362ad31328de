package discovery

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
)

// TestIPColocationOnTheWire: gossipsub counts every IPv6 address of a /64
// as one, and mocknet puts all its hosts in 100::/64, so here every peer
// of the observer sits behind one address, as volunteers behind a campus
// or carrier-grade NAT do. Up to the threshold (the table's per-address
// bound too) they are scored as anyone else and their announcements keep
// arriving; beyond it each is penalised, and a crowd is graylisted.
// Loopback hosts cannot show this: gossipsub leaves loopback out of P6.
func TestIPColocationOnTheWire(t *testing.T) {
	for _, tc := range []struct {
		name   string
		peers  int
		admits bool
	}{
		{"40 behind one address, announcing", 40, true},
		{"threshold + 10: graylisted", DefaultIPColocationThreshold + 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mn := mocknet.New()
			t.Cleanup(func() { _ = mn.Close() })
			gen := func() host.Host {
				h, err := mn.GenPeer()
				if err != nil {
					t.Fatal(err)
				}
				return h
			}
			scores := make(scoreWatch, 1)
			hv := gen()
			observer := newDiscovery(t, hv, scores.option())
			var ids []peer.ID
			for i := range tc.peers {
				h := gen()
				ids = append(ids, h.ID())
				d := newDiscovery(t, h)
				if _, err := mn.LinkPeers(hv.ID(), h.ID()); err != nil {
					t.Fatal(err)
				}
				if _, err := mn.ConnectPeers(h.ID(), hv.ID()); err != nil {
					t.Fatal(err)
				}
				if tc.admits {
					t.Cleanup(heartbeat(t, d, fmt.Sprintf("m%d", i), 500*time.Millisecond))
				}
			}
			if !tc.admits {
				scores.wait(t, "every peer graylisted", func(m map[peer.ID]float64) bool {
					return !slices.ContainsFunc(ids, func(p peer.ID) bool { return m[p] >= graylistThreshold })
				})
				return
			}
			inTable := func(es []Entry) bool {
				n := 0
				for _, e := range es {
					if slices.Contains(ids, e.Peer) {
						n++
					}
				}
				return n == len(ids)
			}
			waitTable(t, observer, "every peer's announcement in the table", inTable)
			// Their scores stay clear of the gossip threshold, and their
			// refreshes keep arriving: every peer's entry moves on to a
			// newer announcement.
			scores.wait(t, "every peer scored above the gossip threshold", func(m map[peer.ID]float64) bool {
				return !slices.ContainsFunc(ids, func(p peer.ID) bool { s, ok := m[p]; return !ok || s <= gossipThreshold })
			})
			seqs := map[peer.ID]uint64{}
			for _, e := range observer.Table().Snapshot() {
				seqs[e.Peer] = e.Announce.GetSeq()
			}
			waitTable(t, observer, "a newer announcement of every peer", func(es []Entry) bool {
				fresh := 0
				for _, e := range es {
					if s, ok := seqs[e.Peer]; ok && slices.Contains(ids, e.Peer) && e.Announce.GetSeq() > s {
						fresh++
					}
				}
				return fresh == len(ids)
			})
		})
	}
}
