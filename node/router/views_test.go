package router

import (
	"slices"
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func TestReachabilityFromAnnouncedAddrs(t *testing.T) {
	const r1, r2 = "12D3KooWLRPJAA5o6uKF6hLdGR5CKSjWVZ7H2JVsW8AJCpjyTu5a", "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
	bin := func(ss ...string) [][]byte {
		var out [][]byte
		for _, s := range ss {
			out = append(out, ma.StringCast(s).Bytes())
		}
		return out
	}
	for _, tc := range []struct {
		name  string
		addrs [][]byte
		kind  string
		via   []string
	}{
		{"none", nil, "", nil},
		{"public", bin("/ip4/11.3.0.1/tcp/4001", "/ip4/10.1.0.2/tcp/4001"), "public", nil},
		{"LAN only", bin("/ip4/10.1.0.2/tcp/4001", "/ip4/127.0.0.1/tcp/4001"), "private", nil},
		{"CGNAT range is not public", bin("/ip4/100.64.0.9/tcp/4001"), "private", nil},
		{"relayed, two relays, one listed twice", bin(
			"/ip4/10.1.0.2/tcp/4001",
			"/ip4/11.1.0.1/tcp/4001/p2p/"+r1+"/p2p-circuit",
			"/ip4/11.1.0.1/udp/4001/quic-v1/p2p/"+r1+"/p2p-circuit",
			"/ip4/11.2.0.1/tcp/4001/p2p/"+r2+"/p2p-circuit"), "relayed", []string{r1, r2}},
		{"garbage is skipped", append(bin("/ip4/11.3.0.1/tcp/4001"), []byte{0xff, 0x01}), "public", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, via := Reachability(tc.addrs)
			if kind != tc.kind || !slices.Equal(via, tc.via) {
				t.Errorf("got %q %v, want %q %v", kind, via, tc.kind, tc.via)
			}
		})
	}
}
