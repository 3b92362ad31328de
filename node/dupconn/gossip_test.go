package dupconn

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/liveness"
)

// What a node names expendable, gossipsub not among them.
var nodeExpendable = []protocol.ID{identify.ID, identify.IDPush, ping.ID, "/mtor/test/kad/1.0.0"}

type gossiper struct {
	h     host.Host
	topic *pubsub.Topic
	sub   *pubsub.Subscription
}

func newGossiper(t *testing.T, h host.Host) gossiper {
	t.Helper()
	ps, err := pubsub.NewGossipSub(t.Context(), h)
	if err != nil {
		t.Fatal(err)
	}
	g := gossiper{h: h}
	if g.topic, err = ps.Join("t"); err != nil {
		t.Fatal(err)
	}
	if g.sub, err = g.topic.Subscribe(); err != nil {
		t.Fatal(err)
	}
	return g
}

// flows checks that from's messages reach to, publishing every 100 ms
// (gossipsub reopens a broken stream after a backoff) for up to 10 s.
func flows(t *testing.T, from, to gossiper) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got := make(chan error, 1)
	go func() {
		for {
			m, err := to.sub.Next(ctx)
			if err != nil {
				got <- err
				return
			}
			if m.ReceivedFrom == from.h.ID() {
				got <- nil
				return
			}
		}
	}()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case err := <-got:
			if err != nil {
				t.Fatalf("no message from %s reached %s: %v", from.h.ID(), to.h.ID(), err)
			}
			return
		case <-tick.C:
			if err := from.topic.Publish(ctx, []byte(fmt.Sprintf("m%d", n))); err != nil {
				t.Fatalf("publish: %v", err)
			}
		}
	}
}

// gossipStreams counts the gossipsub streams on h's connections to p.
func gossipStreams(h host.Host, p peer.ID) int {
	n := 0
	for _, c := range h.Network().ConnsToPeer(p) {
		for _, s := range c.GetStreams() {
			if strings.HasPrefix(string(s.Protocol()), "/meshsub/") {
				n++
			}
		}
	}
	return n
}

// TestGossipStreamsAreNotExpendable: a connection that carries gossipsub's
// streams is never closed, even when the other carries more work; once
// that work ends the idle one goes, and gossip flows both ways.
func TestGossipStreamsAreNotExpendable(t *testing.T) {
	lo, hi := keys(t)
	a := newHost(t, lo)
	echo(a)
	ga := newGossiper(t, a)
	// b1 and b2 hold one key: a sees one peer, gossiping on the QUIC
	// connection to b1; b2 dials in over TCP with three queries.
	b1, b2 := newHost(t, hi), newHost(t, hi)
	gb := newGossiper(t, b1)
	if err := a.Connect(t.Context(), peer.AddrInfo{ID: b1.ID(), Addrs: []ma.Multiaddr{addrOf(t, b1, ma.P_QUIC_V1)}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for gossipStreams(a, b1.ID()) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d gossipsub streams between a and b1, want 2", gossipStreams(a, b1.ID()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := b2.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{addrOf(t, a, ma.P_TCP)}}); err != nil {
		t.Fatal(err)
	}
	var queries []network.Stream
	for range 3 {
		queries = append(queries, query(t, b2, a.ID()))
	}
	pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(nodeExpendable...))
	for range 3 {
		if n := pr.Sweep(t.Context()); n != 0 {
			t.Fatalf("closed %d connections while both carried streams, want 0", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, s := range queries {
		_ = s.Close()
	}
	sweepUntil(t, pr, 1)
	if got := transports(a, b1.ID()); len(got) != 1 || got[0] != "quic-v1" {
		t.Fatalf("transports %v, want the gossiping QUIC connection alone", got)
	}
	flows(t, ga, gb)
	flows(t, gb, ga)
}

// TestGossipFlowsAfterTheSweep: two gossipsub peers that dialled each
// other at once hold two connections, each end's gossipsub stream on
// either; after both ends' sweeps gossip flows both ways, whether a
// connection could be closed or not.
func TestGossipFlowsAfterTheSweep(t *testing.T) {
	lo, hi := keys(t)
	a, b := newHost(t, lo), newHost(t, hi)
	ga, gb := newGossiper(t, a), newGossiper(t, b)
	raced(t, a, b)
	deadline := time.Now().Add(5 * time.Second)
	for gossipStreams(a, b.ID()) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d gossipsub streams between a and b, want 2", gossipStreams(a, b.ID()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	prunes := []*Pruner{
		New(a, liveness.Probe, WithGrace(0), WithExpendable(nodeExpendable...)),
		New(b, liveness.Probe, WithGrace(0), WithExpendable(nodeExpendable...)),
	}
	for range 3 {
		for _, p := range prunes {
			p.Sweep(t.Context())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if prunes[1].Closed() != 0 {
		t.Fatalf("the higher peer ID's end closed %d connections, want 0", prunes[1].Closed())
	}
	t.Logf("connections closed: %d; left: %v", prunes[0].Closed(), transports(a, b.ID()))
	flows(t, ga, gb)
	flows(t, gb, ga)
}
