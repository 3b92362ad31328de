package node

import (
	"testing"

	basicconnmgr "github.com/libp2p/go-libp2p/p2p/net/connmgr"
)

// A node without the swarm view that relays nothing (a pure worker) keeps
// few connections; a node with the view or a relay keeps many.
func TestConnLimitsByRole(t *testing.T) {
	for _, tc := range []struct {
		name      string
		opts      []Option
		low, high int
	}{
		{"swarm view", nil, connLow, connHigh},
		{"no swarm view", []Option{WithSwarmView(false)}, connLowLean, connHighLean},
		{"relay without the swarm view", []Option{WithSwarmView(false), WithRelayService(true)}, connLow, connHigh},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := startTestNode(t, tc.opts...)
			cm, ok := n.h.ConnManager().(*basicconnmgr.BasicConnMgr)
			if !ok {
				t.Fatalf("connection manager %T, want the basic one", n.h.ConnManager())
			}
			if info := cm.GetInfo(); info.LowWater != tc.low || info.HighWater != tc.high {
				t.Fatalf("watermarks %d/%d, want %d/%d", info.LowWater, info.HighWater, tc.low, tc.high)
			}
		})
	}
}
