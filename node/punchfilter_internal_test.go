package node

import (
	"slices"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

func maddrs(t *testing.T, ss ...string) []ma.Multiaddr {
	t.Helper()
	out := make([]ma.Multiaddr, 0, len(ss))
	for _, s := range ss {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func addrStrings(as []ma.Multiaddr) []string {
	out := make([]string, 0, len(as))
	for _, a := range as {
		out = append(out, a.String())
	}
	return out
}

// Both ends of a punch, each with its filter, exchange their addresses as
// DCUtR does (each sends its own, then reads the other's) and must dial
// the same transport: QUIC alone when both sent QUIC, else everything.
func TestPunchFilterBothEndsDialOneTransport(t *testing.T) {
	const (
		aTCP  = "/ip4/11.3.0.1/tcp/4001"
		aQUIC = "/ip4/11.3.0.1/udp/4001/quic-v1"
		bTCP  = "/ip4/11.4.0.1/tcp/4001"
		bQUIC = "/ip4/11.4.0.1/udp/4001/quic-v1"
		bWT   = "/ip4/11.4.0.1/udp/4002/quic-v1/webtransport"
		// What a responding end's libp2p hands its filter holds its
		// relayed addresses too; the other end drops them unfiltered.
		bRelayQUIC = "/ip4/11.1.0.1/udp/4001/quic-v1/p2p/12D3KooWMwApsJZTvFSUamaiQQW8KpqSbt2KSpDUCVRrFTLvbTSV/p2p-circuit"
	)
	pa, pb := peer.ID("a"), peer.ID("b")
	for _, tc := range []struct {
		name         string
		a, b         []string
		aDials       []string // what a dials of b's
		bDials       []string // what b dials of a's
		skipLocalOfA bool     // a's CONNECT went out before the filter saw it
	}{
		{"both QUIC: QUIC alone", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, []string{bQUIC}, []string{aQUIC}, false},
		{"one end without QUIC: all", []string{aTCP}, []string{bTCP, bQUIC}, []string{bTCP, bQUIC}, []string{aTCP}, false},
		{"the other end without QUIC: all", []string{aTCP, aQUIC}, []string{bTCP}, []string{bTCP}, []string{aTCP, aQUIC}, false},
		{"neither: all", []string{aTCP}, []string{bTCP}, []string{bTCP}, []string{aTCP}, false},
		{"a relay's QUIC address is not ours", []string{aTCP, aQUIC}, []string{bRelayQUIC, bTCP}, []string{bRelayQUIC, bTCP}, []string{aTCP, aQUIC}, false},
		{"WebTransport is not plain QUIC", []string{aTCP, aQUIC}, []string{bTCP, bWT}, []string{bTCP, bWT}, []string{aTCP, aQUIC}, false},
		{"nothing known of what a sent: a dials all", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, []string{bTCP, bQUIC}, []string{aQUIC}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa, fb := newPunchFilter(), newPunchFilter()
			aSent, bSent := maddrs(t, tc.a...), maddrs(t, tc.b...)
			if !tc.skipLocalOfA {
				if got := fa.FilterLocal(pb, aSent); !slices.Equal(addrStrings(got), tc.a) {
					t.Fatalf("a sends %v, want all of its addresses %v", addrStrings(got), tc.a)
				}
			}
			if got := fb.FilterLocal(pa, bSent); !slices.Equal(addrStrings(got), tc.b) {
				t.Fatalf("b sends %v, want all of its addresses %v", addrStrings(got), tc.b)
			}
			if got := addrStrings(fa.FilterRemote(pb, bSent)); !slices.Equal(got, tc.aDials) {
				t.Errorf("a dials %v, want %v", got, tc.aDials)
			}
			if got := addrStrings(fb.FilterRemote(pa, aSent)); !slices.Equal(got, tc.bDials) {
				t.Errorf("b dials %v, want %v", got, tc.bDials)
			}
			// The note is used once: a CONNECT read without one sent
			// (no FilterLocal) dials all.
			if got := addrStrings(fa.FilterRemote(pb, bSent)); !slices.Equal(got, tc.b) {
				t.Errorf("a second FilterRemote dials %v, want all %v", got, tc.b)
			}
		})
	}
}

// The notes of punches that never read the peer's CONNECT stay bounded.
func TestPunchFilterBounded(t *testing.T) {
	f := newPunchFilter()
	addrs := maddrs(t, "/ip4/11.3.0.1/udp/4001/quic-v1")
	for i := range 3 * maxPunched {
		f.FilterLocal(peer.ID(rune(i)), addrs)
	}
	f.mu.Lock()
	n := len(f.sent)
	f.mu.Unlock()
	if n > maxPunched {
		t.Fatalf("%d notes kept, want at most %d", n, maxPunched)
	}
}
