package node

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
)

func startTestNode(t *testing.T, opts ...Option) *Node {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	n, err := New(context.Background(), append([]Option{
		WithIdentity(key), WithListenAddrs("/ip4/127.0.0.1/tcp/0"), WithMDNS(false),
		WithAnnounceInterval(200 * time.Millisecond),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// A node learns the swarm's relays from announcements and offers them to
// autorelay; nodes without the relay role are never offered.
func TestRelaySourceOffersSwarmRelays(t *testing.T) {
	relay := startTestNode(t, WithRelayService(true))
	plain := startTestNode(t, WithJoin(relay.JoinLine()))
	natted := startTestNode(t, WithJoin(relay.JoinLine()))
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, okR := natted.disc.Table().Get(relay.ID())
		_, okP := natted.disc.Table().Get(plain.ID())
		if okR && okP {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("tables did not converge")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var got []string
	for ai := range natted.relays.peers(context.Background(), 4) {
		if len(ai.Addrs) == 0 {
			t.Errorf("relay %s offered without addresses", ai.ID)
		}
		got = append(got, ai.ID.String())
	}
	if len(got) != 1 || got[0] != relay.ID().String() {
		t.Fatalf("offered relays %v, want only %s", got, relay.ID())
	}
}

// Our unlimited relay serves swarm members only: a stranger's reservation
// is refused, a member's granted.
func TestRelayServesSwarmMembersOnly(t *testing.T) {
	relayNode := startTestNode(t, WithRelayService(true))
	member := startTestNode(t, WithJoin(relayNode.JoinLine()))
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, ok := relayNode.disc.Table().Get(member.ID()); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("relay never saw the member's announcement")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ai := peer.AddrInfo{ID: relayNode.ID(), Addrs: relayNode.Host().Addrs()}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	stranger, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	if err := stranger.Connect(ctx, ai); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Reserve(ctx, stranger, ai); err == nil {
		t.Fatal("the relay granted a reservation to a peer outside the swarm")
	}
	if _, err := client.Reserve(ctx, member.Host(), ai); err != nil {
		t.Fatalf("the relay refused a swarm member: %v", err)
	}
}
