package node

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	basicconnmgr "github.com/libp2p/go-libp2p/p2p/net/connmgr"

	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
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

// A pure worker behind NAT (no swarm view, no relay service: the lean
// bound) that more than connHighLean strangers connect to trims to about
// connLowLean, and keeps through the trim what it lives on: its relay
// (protected while it holds a reservation), its bootstrap (protected),
// and a router that follows its model (tagged as a follower; in a swarm
// this small gossipsub also protects it as a mesh peer of the topic, so
// discovery's TestTrimKeepsFollowers tests the tag alone); the router
// still gets answers from it afterwards. Real nodes and connection
// manager; only the grace period is shortened, which would spare every
// connection of the last minute.
func TestLeanWorkerTrimKeepsItsPeers(t *testing.T) {
	boot := startTestNode(t)
	relay := startTestNode(t, WithRelayService(true), WithJoin(boot.JoinLine()))
	wk := startTestNode(t, WithJoin(boot.JoinLine()), WithReachability(ReachabilityPrivate), WithRelays(1),
		WithSwarmView(false), WithBackends(demo.New("lean")), withConnGrace(time.Millisecond))
	router := startTestNode(t, WithJoin(boot.JoinLine()), WithSwarmView(false))
	waitFor(t, 15*time.Second, "reservation on the relay", func() bool { return relayedThrough(wk, relay.ID()) })
	ask := func(what string) error {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
		defer cancel()
		res, err := router.Router().Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: demo.DefaultModel, Prompt: what},
			func(*pb.Event) error { return nil })
		switch {
		case err != nil:
			return err
		case res.Peer != wk.ID():
			t.Fatalf("%s: answered by %s, want the worker", what, res.Peer)
		}
		return nil
	}
	// Until the worker's provider record is in the DHT, the router finds
	// no worker of the model.
	waitFor(t, 20*time.Second, "a first answer", func() bool { return ask("before the crowd") == nil })
	followTag := "mtor-follower:" + protocol.ModelTopic(protocol.DefaultSwarm, demo.DefaultModel)
	waitFor(t, 10*time.Second, "the router tagged as a follower", func() bool {
		ti := wk.h.ConnManager().GetTagInfo(router.ID())
		return ti != nil && ti.Tags[followTag] > 0
	})

	const crowd = connHighLean + 20
	// The manager's own trim may run while the crowd connects (it looks
	// every 10 s, and this loop can take that long on a loaded machine):
	// what counts is that the crowd passed the bound, and what the trims
	// leave.
	peak := 0
	for i := range crowd {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ResourceManager(&network.NullResourceManager{}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		if err := h.Connect(t.Context(), peer.AddrInfo{ID: wk.ID(), Addrs: wk.h.Addrs()}); err != nil {
			t.Fatalf("stranger %d: %v", i, err)
		}
		peak = max(peak, len(wk.h.Network().Peers()))
	}
	before := len(wk.h.Network().Peers())
	if peak <= connHighLean {
		t.Fatalf("at most %d peers connected, want more than %d", peak, connHighLean)
	}
	// The manager trims the connections it knows, and learns each one
	// after the swarm: one it has not seen yet would survive the trim.
	cm, ok := wk.h.ConnManager().(*basicconnmgr.BasicConnMgr)
	if !ok {
		t.Fatalf("the worker's connection manager is a %T", wk.h.ConnManager())
	}
	waitFor(t, 10*time.Second, "the connection manager to know every connection", func() bool {
		return cm.GetInfo().ConnCount >= len(wk.h.Network().Conns())
	})
	time.Sleep(10 * time.Millisecond) // past the grace period
	wk.h.ConnManager().TrimOpenConns(t.Context())
	after := len(wk.h.Network().Peers())
	t.Logf("peers connected: %d at most, %d before the trim, %d after", peak, before, after)
	// Protected peers are not counted against the low watermark.
	if after > connLowLean+3 {
		t.Fatalf("%d peers connected after the trim, want about %d", after, connLowLean)
	}
	for _, p := range []struct {
		name string
		id   peer.ID
	}{{"relay", relay.ID()}, {"bootstrap", boot.ID()}, {"following router", router.ID()}} {
		if wk.h.Network().Connectedness(p.id) != network.Connected {
			t.Errorf("the trim closed the connection to the %s", p.name)
		}
	}
	if !relayedThrough(wk, relay.ID()) {
		t.Error("the reservation on the relay is gone")
	}
	if err := ask("after the trim"); err != nil {
		t.Fatalf("after the trim: %v", err)
	}
}
