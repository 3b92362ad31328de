package discovery

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// TestTrafficCountsGossip: announcements published by one node show as
// bytes and messages out at it and in at the other, and as deliveries.
func TestTrafficCountsGossip(t *testing.T) {
	ha, hb := newHost(t), newHost(t)
	a := newDiscovery(t, ha)
	b := newDiscovery(t, hb, WithBootstrap([]peer.AddrInfo{info(ha)}))
	waitTopicPeer(t, a.PubSub(), hb.ID())
	if got := a.Traffic(); got.MsgsOut != 0 || got.Delivered != 0 {
		t.Fatalf("traffic before any publish = %+v", got)
	}
	heartbeat(t, a, "m", 100*time.Millisecond)
	waitTable(t, b, "a's announcement", func(es []Entry) bool { return len(es) == 1 })
	deadline := time.Now().Add(waitLimit)
	for {
		ta, tb := a.Traffic(), b.Traffic()
		if ta.MsgsOut >= 2 && tb.MsgsIn >= 2 && tb.Delivered >= 2 {
			if ta.BytesOut < 100*ta.MsgsOut/2 || tb.BytesIn == 0 || ta.RPCsOut == 0 || tb.RPCsIn == 0 {
				t.Fatalf("sizes do not add up: a %+v, b %+v", ta, tb)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("traffic never counted: a %+v, b %+v", ta, tb)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
