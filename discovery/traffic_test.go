package discovery

import (
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/discovery/hostiletest"
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

// TestTrafficSortsRefusals: each of gossipsub's reasons for not
// delivering a message lands in one counter, and our own messages in none.
func TestTrafficSortsRefusals(t *testing.T) {
	for _, tc := range []struct {
		reason string
		want   Traffic
	}{
		{pubsub.RejectValidationIgnored, Traffic{Ignored: 1}},
		{pubsub.RejectValidationFailed, Traffic{Rejected: 1}},
		{pubsub.RejectInvalidSignature, Traffic{Rejected: 1}},
		{pubsub.RejectBlacklstedPeer, Traffic{Rejected: 1}},
		{pubsub.RejectValidationQueueFull, Traffic{Throttled: 1}},
		{pubsub.RejectValidationThrottled, Traffic{Throttled: 1}},
		{pubsub.RejectSelfOrigin, Traffic{}},
		{"undeliverable", Traffic{Undeliverable: 1}},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			var tr trafficTracer
			if tc.reason == "undeliverable" {
				tr.UndeliverableMessage(&pubsub.Message{})
			} else {
				tr.RejectMessage(&pubsub.Message{}, tc.reason)
			}
			if got := tr.snapshot(); got != tc.want {
				t.Fatalf("counted %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestBurstIsValidatedNotDropped: a burst of announcements, as a swarm
// view gets when hundreds of heartbeats and their forwarded copies arrive
// together, waits for validation instead of being dropped. Gossipsub's
// default queue (32) threw most of such a burst away.
func TestBurstIsValidatedNotDropped(t *testing.T) {
	hv := newHost(t)
	victim := newDiscovery(t, hv)
	ctx := hostileCtx(t)
	rogue := hostiletest.New(t, testSwarm)
	const burst = 200
	// Loopback port 1: nobody listens there.
	sent, err := rogue.BurstFreshKeys(ctx, info(hv), burst, "demo", ma.StringCast("/ip4/127.0.0.1/tcp/1"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(waitLimit)
	for {
		tr := victim.Traffic()
		judged := tr.Delivered + tr.Ignored + tr.Rejected
		if tr.Throttled > 0 {
			t.Fatalf("%d of a burst of %d dropped unvalidated: %+v", tr.Throttled, sent, tr)
		}
		if judged >= uint64(sent) {
			t.Logf("a burst of %d: %+v", sent, tr)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a burst of %d not all judged: %+v", sent, tr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
