package relayaddr

import (
	"testing"

	ma "github.com/multiformats/go-multiaddr"
)

func TestIsCircuit(t *testing.T) {
	cases := []struct {
		addr string
		want bool
	}{
		{"/ip4/1.2.3.4/tcp/4001", false},
		{"/ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3KooWLNGjtXGnMbity7dfo6HbLn2YZLvLzV3LCKEfV1gU7aAi", false},
		{"/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWLNGjtXGnMbity7dfo6HbLn2YZLvLzV3LCKEfV1gU7aAi/p2p-circuit", true},
		{"/ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3KooWLNGjtXGnMbity7dfo6HbLn2YZLvLzV3LCKEfV1gU7aAi/p2p-circuit/p2p/12D3KooWMe3TKwJ53VGmXxFRx6KhvTaxu8gq1eYFWSHzioYZSsVR", true},
	}
	for _, tc := range cases {
		if got := IsCircuit(ma.StringCast(tc.addr)); got != tc.want {
			t.Errorf("IsCircuit(%s) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}
