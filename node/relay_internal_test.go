package node

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/relayaddr"
	"github.com/mtor-swarm/mtor/protocol"
)

func startTestNode(t *testing.T, opts ...Option) *Node {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	return startKeyedNode(t, key, "/ip4/127.0.0.1/tcp/0", opts...)
}

func startKeyedNode(t *testing.T, key crypto.PrivKey, listen string, opts ...Option) *Node {
	t.Helper()
	n, err := New(context.Background(), append([]Option{
		WithIdentity(key), WithListenAddrs(listen), WithMDNS(false),
		WithAnnounceInterval(200 * time.Millisecond),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// restartableIdentity is a key and a loopback TCP address nothing
// listens on now: a peer started again with both is the same peer at the
// same address.
func restartableIdentity(t *testing.T) (crypto.PrivKey, string) {
	t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return key, fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", ln.Addr().(*net.TCPAddr).Port)
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !ok() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func relayedThrough(n *Node, relay peer.ID) bool {
	for _, r := range n.Reachability().Relays {
		if r.Peer == relay && len(r.Addrs) > 0 {
			return true
		}
	}
	return false
}

func announcesCircuit(seen *Node, p peer.ID) bool {
	e, ok := seen.disc.Table().Get(p)
	if !ok {
		return false
	}
	for _, b := range e.Announce.GetAddrs() {
		if m, err := ma.NewMultiaddrBytes(b); err == nil && relayaddr.IsCircuit(m) {
			return true
		}
	}
	return false
}

// A private node reserves on the swarm's relay as soon as it sees its
// announcement (one candidate is enough, no boot delay), holds
// reservations on two relays, never on a node without the relay role,
// and announces its relayed addresses at once.
func TestRelayKeeperReservesAtOnce(t *testing.T) {
	r1 := startTestNode(t, WithRelayService(true))
	r2 := startTestNode(t, WithRelayService(true), WithJoin(r1.JoinLine()))
	plain := startTestNode(t, WithJoin(r1.JoinLine()))
	natted := startTestNode(t, WithJoin(r1.JoinLine()), WithReachability(ReachabilityPrivate))
	took := waitFor(t, 10*time.Second, "reservations on both relays", func() bool {
		return relayedThrough(natted, r1.ID()) && relayedThrough(natted, r2.ID())
	})
	t.Logf("reservations on 2 relays %s after start", took.Round(time.Millisecond))
	if relayedThrough(natted, plain.ID()) {
		t.Fatal("reserved on a node without the relay role")
	}
	// The connection manager's trim would end a reservation.
	for _, r := range []*Node{r1, r2} {
		if !natted.h.ConnManager().IsProtected(r.ID(), relayTag) {
			t.Fatalf("the connection to relay %s is not protected", r.ID())
		}
	}
	if natted.h.ConnManager().IsProtected(plain.ID(), relayTag) {
		t.Fatal("a node that is no relay of ours is protected as one")
	}
	if ri := natted.Reachability(); ri.Status != ReachabilityPrivate || ri.How != "forced" {
		t.Fatalf("reachability %v (%s), want private (forced)", ri.Status, ri.How)
	}
	waitFor(t, 5*time.Second, "relayed address announced", func() bool { return announcesCircuit(plain, natted.ID()) })
	if ri := r1.Reachability(); ri.Status != ReachabilityPublic || len(ri.Relays) != 0 {
		t.Fatalf("relay's reachability %v with %d relays, want public with none", ri.Status, len(ri.Relays))
	}
}

// A private node joined only to a bootstrap that is no relay reserves on
// the swarm's relay elsewhere, with the swarm view (it reads the relay's
// announcements on the swarm topic) and without (it asks for the relay
// topic and finds the relay in the DHT); only the latter reads the relay
// topic, and a public node without the swarm view never does.
func TestRelayKeeperFindsRelays(t *testing.T) {
	for _, tc := range swarmViewCases {
		t.Run(tc.name, func(t *testing.T) {
			boot := startTestNode(t)
			relay := startTestNode(t, WithRelayService(true), WithJoin(boot.JoinLine()))
			natted := startTestNode(t, WithJoin(boot.JoinLine()), WithReachability(ReachabilityPrivate), WithRelays(1), WithSwarmView(tc.swarmView))
			public := startTestNode(t, WithJoin(boot.JoinLine()), WithReachability(ReachabilityPublic), WithSwarmView(false))
			took := waitFor(t, 15*time.Second, "reservation on the relay", func() bool { return relayedThrough(natted, relay.ID()) })
			t.Logf("reservation %s after start", took.Round(time.Millisecond))
			waitFor(t, 5*time.Second, "relayed address announced", func() bool { return announcesCircuit(boot, natted.ID()) })
			if got := natted.disc.WatchingRelays(); got == tc.swarmView {
				t.Fatalf("the private node reads the relay topic: %v, want %v", got, !tc.swarmView)
			}
			if public.disc.WatchingRelays() {
				t.Fatal("a public node reads the relay topic")
			}
		})
	}
}

// A relay that restarts (same identity and address) is used again within
// seconds: its empty table must not refuse the member, and a refusal or a
// failed dial must not lock the relay out. Without the swarm view too:
// the relay lost, the node looks for relays again at once.
func TestRelayKeeperReservesAgainAfterRelayRestart(t *testing.T) {
	for _, tc := range swarmViewCases {
		t.Run(tc.name, func(t *testing.T) {
			key, listen := restartableIdentity(t)
			boot := startTestNode(t)
			relay := startKeyedNode(t, key, listen, WithRelayService(true), WithJoin(boot.JoinLine()))
			natted := startTestNode(t, WithJoin(boot.JoinLine()), WithReachability(ReachabilityPrivate), WithRelays(1), WithSwarmView(tc.swarmView))
			waitFor(t, 10*time.Second, "first reservation", func() bool { return relayedThrough(natted, relay.ID()) })
			relay.Close()
			waitFor(t, 5*time.Second, "lost relay noticed", func() bool { return !relayedThrough(natted, relay.ID()) })
			relay = startKeyedNode(t, key, listen, WithRelayService(true), WithJoin(boot.JoinLine()))
			took := waitFor(t, 15*time.Second, "reservation on the restarted relay", func() bool { return relayedThrough(natted, relay.ID()) })
			t.Logf("reservation again %s after the relay restarted", took.Round(time.Millisecond))
		})
	}
}

// Our unlimited relay serves swarm members only: a stranger's reservation
// is refused; a member's is granted, also one the relay has not yet seen
// announce (it speaks the swarm's query protocol).
func TestRelayServesSwarmMembersOnly(t *testing.T) {
	relayNode := startTestNode(t, WithRelayService(true))
	member := startTestNode(t, WithJoin(relayNode.JoinLine()))
	waitFor(t, 20*time.Second, "relay saw the member's announcement", func() bool {
		_, ok := relayNode.disc.Table().Get(member.ID())
		return ok
	})
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
	unannounced := lightMember(t, relayNode.SwarmName())
	if _, err := client.Reserve(ctx, unannounced, ai); err != nil {
		t.Fatalf("the relay refused a member it has not seen announce: %v", err)
	}
}

// lightMember is a bare host that speaks the swarm's query protocol.
func lightMember(t *testing.T, swarm string) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	h.SetStreamHandler(protocol.QueryProtocol(swarm), func(s network.Stream) { s.Reset() })
	return h
}

// Dozens of volunteers behind one carrier-grade NAT share one address: a
// relay holds reservations for 30 peers of one IP (libp2p's default: 8).
func TestRelayReservationsPerIP(t *testing.T) {
	relayNode := startTestNode(t, WithRelayService(true))
	ai := peer.AddrInfo{ID: relayNode.ID(), Addrs: relayNode.Host().Addrs()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 30 {
		h := lightMember(t, relayNode.SwarmName())
		// A host just made may send its first identify before it lists
		// the handler set a moment ago (libp2p updates it asynchronously,
		// then pushes it): the relay then refuses it as a non-member,
		// and the relay keeper retries, as here.
		var err error
		for range 20 {
			if _, err = client.Reserve(ctx, h, ai); err == nil || !strings.Contains(err.Error(), "PERMISSION_DENIED") {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("reservation %d of one IP refused: %v", i+1, err)
		}
	}
}

// The resource manager admits many connections from one IPv4 address
// (libp2p's default: 8).
func TestConnectionsPerIP(t *testing.T) {
	rm, err := resourceManager(protocol.QueryProtocol(protocol.DefaultSwarm), 0, false)
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	from := ma.StringCast("/ip4/100.64.7.9/tcp/4001")
	for i := range 50 {
		s, err := rm.OpenConnection(network.DirInbound, true, from)
		if err != nil {
			t.Fatalf("connection %d from one address refused: %v", i+1, err)
		}
		defer s.Done()
	}
}

// Join tokens hold no loopback address when there is another.
func TestShareableAddrs(t *testing.T) {
	lo, lan := ma.StringCast("/ip4/127.0.0.1/tcp/1"), ma.StringCast("/ip4/10.1.0.2/tcp/1")
	if got := shareable([]ma.Multiaddr{lo, lan}); len(got) != 1 || !got[0].Equal(lan) {
		t.Fatalf("shareable = %v, want only %s", got, lan)
	}
	if got := shareable([]ma.Multiaddr{lo}); len(got) != 1 {
		t.Fatalf("a loopback-only node must keep its address, got %v", got)
	}
}

// swarmViewCases runs a relay test with the swarm view and without it
// (then relays are found through the relay topic and the DHT).
var swarmViewCases = []struct {
	name      string
	swarmView bool
}{
	{"swarm view", true},
	{"no swarm view", false},
}
