package node

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
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
