package dupconn

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/internal/relaytest"
	"github.com/mtor-swarm/mtor/node/liveness"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// relayed connects a to b through r only, b holding a reservation on r,
// and returns that connection.
func relayed(t *testing.T, a, b, r host.Host) network.Conn {
	t.Helper()
	relaytest.Reserve(t, b, r)
	c := relaytest.Dial(t, a, b, r)
	if conns := a.Network().ConnsToPeer(b.ID()); len(conns) != 1 {
		t.Fatalf("connections %v, want one relayed", conns)
	}
	return c
}

// direct dials b from a over one transport, although a is connected to
// b already, as a hole punch does.
func direct(t *testing.T, a, b host.Host, proto int) network.Conn {
	t.Helper()
	a.Peerstore().AddAddr(b.ID(), addrOf(t, b, proto), peerstore.TempAddrTTL)
	ctx, cancel := context.WithTimeout(network.WithForceDirectDial(t.Context(), "test"), 10*time.Second)
	defer cancel()
	c, err := a.Network().DialPeer(ctx, b.ID())
	if err != nil {
		t.Fatal(err)
	}
	if relayaddr.IsRelayed(c) {
		t.Fatal("the direct dial gave a relayed connection")
	}
	return c
}

// TestSweepLeavesTheRelayedConnection: a relayed connection and the
// direct one a hole punch made beside it are not duplicates. The direct
// one is the point of the punch; the relayed one is the fallback the
// router retries on when the NATs' mappings die. Neither is closed, even
// when only the relayed one carries streams that must not break (the
// gossipsub streams opened before the punch), which once closed every
// idle punched connection 10 to 25 s after the punch (the NAT suite's
// restricted/restricted pair, in CI). Among direct connections beside a
// relayed one, the redundant one is still closed.
func TestSweepLeavesTheRelayedConnection(t *testing.T) {
	const onRelayed, onDirect = 1, 2
	cases := []struct {
		name    string
		queryOn int // 0: none
		second  bool
	}{
		{name: "query on the relayed", queryOn: onRelayed},
		{name: "query on the direct", queryOn: onDirect},
		{name: "both idle"},
		{name: "two direct beside it", queryOn: onRelayed, second: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi := keys(t)
			a, b := newHost(t, lo), newHost(t, hi)
			echo(b)
			rc := relayed(t, a, b, relaytest.New(t))
			var s network.Stream
			if tc.queryOn == onRelayed {
				// Before the direct connection exists: the stream stays
				// on the relayed one, as gossipsub's do.
				s = query(t, a, b.ID())
			}
			dc := direct(t, a, b, ma.P_QUIC_V1)
			want := []network.Conn{rc, dc}
			if tc.second {
				// A second process with b's key dials a over TCP, as in
				// twice: libp2p would reuse the QUIC connection for a
				// dial of a's own. The TCP one goes, the QUIC one is kept
				// over it.
				b2 := newHost(t, hi)
				if err := b2.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{addrOf(t, a, ma.P_TCP)}}); err != nil {
					t.Fatal(err)
				}
				if n := len(a.Network().ConnsToPeer(b.ID())); n != 3 {
					t.Fatalf("%d connections to the peer, want 3", n)
				}
			}
			if tc.queryOn == onDirect {
				s = query(t, a, b.ID())
				if s.Conn() != dc {
					t.Fatal("the query did not take the direct connection")
				}
			}
			pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
			if tc.second {
				sweepUntil(t, pr, 1)
			}
			for range 3 {
				if n := pr.Sweep(t.Context()); n != 0 {
					t.Fatalf("closed %d connections, want 0", n)
				}
				time.Sleep(50 * time.Millisecond)
			}
			got := a.Network().ConnsToPeer(b.ID())
			slices.SortFunc(got, func(x, y network.Conn) int { return x.Stat().Opened.Compare(y.Stat().Opened) })
			if !slices.Equal(got, want) {
				t.Fatalf("connections %v after the sweeps, want the relayed %v and the direct %v", got, rc, dc)
			}
			if s != nil {
				roundTrip(t, s, "more")
			}
		})
	}
}

// TestSweepPrunesRelayedConnectionsAmongThemselves: two relayed
// connections to one peer, through two relays, are duplicates of each
// other: the idle one is closed, the one carrying a query kept, and the
// direct connection beside them stays.
func TestSweepPrunesRelayedConnectionsAmongThemselves(t *testing.T) {
	lo, hi := keys(t)
	a, b := newHost(t, lo), newHost(t, hi)
	echo(b)
	rc := relayed(t, a, b, relaytest.New(t))
	s := query(t, a, b.ID())
	// A second process with b's key reaches a through another relay, on
	// which a holds a reservation: libp2p would reuse the first relayed
	// connection for a dial of a's own.
	r2 := relaytest.New(t)
	relaytest.Reserve(t, a, r2)
	relaytest.Dial(t, newHost(t, hi), a, r2)
	dc := direct(t, a, b, ma.P_QUIC_V1)
	if n := len(a.Network().ConnsToPeer(b.ID())); n != 3 {
		t.Fatalf("%d connections to the peer, want 3", n)
	}
	pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
	sweepUntil(t, pr, 1)
	got := a.Network().ConnsToPeer(b.ID())
	slices.SortFunc(got, func(x, y network.Conn) int { return x.Stat().Opened.Compare(y.Stat().Opened) })
	if want := []network.Conn{rc, dc}; !slices.Equal(got, want) {
		t.Fatalf("connections %v after the sweep, want the relayed one with the query %v and the direct %v", got, rc, dc)
	}
	roundTrip(t, s, "more")
}
