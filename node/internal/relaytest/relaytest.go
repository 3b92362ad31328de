// Package relaytest gives tests a circuit relay v2 the way mtor runs
// one: on loopback, public, without the time and data limits that would
// mark its relayed connections Limited (node/host.go's relayResources).
package relaytest

import (
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// New is a relay on a loopback TCP port, closed when t ends.
func New(t testing.TB) host.Host {
	t.Helper()
	rc := relay.DefaultResources()
	rc.Limit = nil
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ForceReachabilityPublic(),
		libp2p.EnableRelayService(relay.WithResources(rc)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// Reserve makes h hold a reservation on r. The relay service starts once
// r's host sees itself public, a moment after its start: refusals are
// retried for up to 10 s.
func Reserve(t testing.TB, h, r host.Host) {
	t.Helper()
	ri := peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}
	if err := h.Connect(t.Context(), ri); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err := client.Reserve(t.Context(), h, ri)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("reservation: %v", err)
		}
	}
}

// Circuit is the address that reaches, through r, a peer holding a
// reservation on it (the peer's ID goes in the AddrInfo).
func Circuit(r host.Host) ma.Multiaddr {
	return r.Addrs()[0].Encapsulate(ma.StringCast("/p2p/" + r.ID().String() + "/p2p-circuit"))
}

// Dial connects from to to through r (to holding a reservation on it) and
// returns the relayed connection, which must not be Limited.
func Dial(t testing.TB, from, to, r host.Host) network.Conn {
	t.Helper()
	if err := from.Connect(t.Context(), peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}); err != nil {
		t.Fatal(err)
	}
	if err := from.Connect(t.Context(), peer.AddrInfo{ID: to.ID(), Addrs: []ma.Multiaddr{Circuit(r)}}); err != nil {
		t.Fatal(err)
	}
	for _, c := range from.Network().ConnsToPeer(to.ID()) {
		if relayaddr.IsRelayed(c) {
			if c.Stat().Limited {
				t.Fatal("the relayed connection is limited; mtor's relays set no limit")
			}
			return c
		}
	}
	t.Fatalf("no relayed connection among %v", from.Network().ConnsToPeer(to.ID()))
	return nil
}
