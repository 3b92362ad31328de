package node

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"

	"github.com/mtor-swarm/mtor/discovery/hostiletest"
)

// A join peer that refuses the node is no join, on TCP and on QUIC. On
// QUIC the node's Connect succeeds and the connection dies a moment
// later; before, the node counted it joined ("connected to 0 peers").
func TestJoinPeerThatRefusesIsNoJoin(t *testing.T) {
	for _, tc := range []struct {
		name, listen, want string
	}{
		{"tcp", "/ip4/127.0.0.1/tcp/0", "connection closed during the handshake"},
		{"quic", "/ip4/127.0.0.1/udp/0/quic-v1", "connection closed right after the handshake"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A join peer that accepts nobody, as a closed swarm's does
			// for a revoked member.
			g := &hostiletest.Refuser{}
			g.Refuse(-1)
			jh, err := libp2p.New(libp2p.ListenAddrStrings(tc.listen), libp2p.ConnectionGater(g))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = jh.Close() })
			join := jh.Addrs()[0].String() + "/p2p/" + jh.ID().String()
			n, err := New(context.Background(), WithDataDir(t.TempDir()), WithListenAddrs(tc.listen),
				WithMDNS(false), WithJoin(join), WithJoinTimeout(5*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = n.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			err = n.WaitJoined(ctx)
			if !errors.Is(err, ErrJoinUnreachable) {
				t.Fatalf("WaitJoined = %v, want %v", err, ErrJoinUnreachable)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("WaitJoined = %q, want it to say %q", err, tc.want)
			}
			t.Logf("%v", err)
		})
	}
}
