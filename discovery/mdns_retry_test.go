package discovery

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// freeAddr is a loopback address on a port nothing listens on now.
func freeAddr(t *testing.T, quic bool) string {
	t.Helper()
	if quic {
		c, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return fmt.Sprintf("/ip4/127.0.0.1/udp/%d/quic-v1", c.LocalAddr().(*net.UDPAddr).Port)
	}
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", l.Addr().(*net.TCPAddr).Port)
}

// A peer that mDNS reports once, while it is still starting (nothing
// listens at its address yet), is dialled again until it is reached:
// mDNS would not report it again for a long while. On TCP and QUIC.
func TestMDNSDialRetries(t *testing.T) {
	for _, quic := range []bool{false, true} {
		t.Run(fmt.Sprintf("quic=%v", quic), func(t *testing.T) {
			key, _, err := crypto.GenerateEd25519Key(nil)
			if err != nil {
				t.Fatal(err)
			}
			id, err := peer.IDFromPrivateKey(key)
			if err != nil {
				t.Fatal(err)
			}
			addr := freeAddr(t, quic)
			listen := "/ip4/127.0.0.1/tcp/0"
			if quic {
				listen = "/ip4/127.0.0.1/udp/0/quic-v1"
			}
			ha := newHostOn(t, []string{listen})
			// A QUIC dial to nobody waits out the dial timeout.
			d := newDiscovery(t, ha, WithDialTimeout(time.Second))
			n := d.startMDNSDialers()
			n.HandlePeerFound(peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(addr)}})
			time.Sleep(1500 * time.Millisecond) // the first dial has failed
			if !n.retrying(id) {
				t.Fatal("no failed dial counted while nothing listened")
			}
			hb, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings(addr))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = hb.Close() })
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for ha.Network().Connectedness(id) != network.Connected {
				if ctx.Err() != nil {
					t.Fatal("not connected 30 s after the peer started")
				}
				time.Sleep(50 * time.Millisecond)
			}
			if n.retrying(id) {
				t.Fatal("the retries of a reached peer are still counted")
			}
		})
	}
}
