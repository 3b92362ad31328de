package discovery

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
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

// refuseFirst is a connection gater that refuses as many inbound
// connections as n holds tokens, when they arrive: on QUIC the dialler's
// handshake has completed by then, and its host.Connect succeeds.
type refuseFirst struct{ n chan struct{} }

func (g refuseFirst) InterceptPeerDial(peer.ID) bool               { return true }
func (g refuseFirst) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }
func (g refuseFirst) InterceptAccept(network.ConnMultiaddrs) bool {
	select {
	case <-g.n:
		return false
	default:
		return true
	}
}
func (g refuseFirst) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (g refuseFirst) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

// triesOf is how many failed dials of p wait for a retry.
func (n *mdnsNotifee) triesOf(p peer.ID) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.tries[p]
}

// A peer that mDNS reports once, and that the first dials do not reach,
// is dialled again until it is: mDNS would not report it again for a
// long while. The peer is still starting (nothing listens at its
// address yet), or refuses its first two connections; on TCP and QUIC.
func TestMDNSDialRetries(t *testing.T) {
	for _, quic := range []bool{false, true} {
		listen := "/ip4/127.0.0.1/tcp/0"
		if quic {
			listen = "/ip4/127.0.0.1/udp/0/quic-v1"
		}
		for _, refusing := range []bool{false, true} {
			name := fmt.Sprintf("quic=%v/", quic) + map[bool]string{false: "starting late", true: "refusing twice"}[refusing]
			t.Run(name, func(t *testing.T) {
				key, _, err := crypto.GenerateEd25519Key(nil)
				if err != nil {
					t.Fatal(err)
				}
				id, err := peer.IDFromPrivateKey(key)
				if err != nil {
					t.Fatal(err)
				}
				addr := freeAddr(t, quic)
				ha := newHostOn(t, []string{listen})
				// A QUIC dial to nobody waits out the dial timeout.
				d := newDiscovery(t, ha, WithDialTimeout(time.Second))
				n := d.startMDNSDialers()
				gate := refuseFirst{n: make(chan struct{}, 2)}
				start := func() {
					hb, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings(addr), libp2p.ConnectionGater(gate))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = hb.Close() })
				}
				if refusing {
					gate.n <- struct{}{}
					gate.n <- struct{}{}
					start()
				}
				n.HandlePeerFound(peer.AddrInfo{ID: id, Addrs: []ma.Multiaddr{ma.StringCast(addr)}})
				time.Sleep(1500 * time.Millisecond) // the first dial has failed
				if n.triesOf(id) == 0 {
					t.Fatal("no failed dial counted")
				}
				if !refusing {
					start()
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				// The swarm reports the connection before the dialer's
				// Connect returns (it waits for identify) and forgets the
				// peer's tries, and a refused QUIC connection is listed a
				// moment: wait for both, the connection and the tries gone.
				for ha.Network().Connectedness(id) != network.Connected || n.triesOf(id) != 0 {
					if ctx.Err() != nil {
						t.Fatalf("30 s on: connected %v, %d retries of the peer still counted, refusals left %d",
							ha.Network().Connectedness(id) == network.Connected, n.triesOf(id), len(gate.n))
					}
					time.Sleep(50 * time.Millisecond)
				}
				if len(gate.n) != 0 {
					t.Fatalf("connected with %d refusals left", len(gate.n))
				}
			})
		}
	}
}

// A full dial queue does not strand retries: peers due for a retry that
// find the queue full wait their next back-off (their entries end with
// their retries), so a flood of unreachable peers cannot hold every
// retry slot and keep an honest peer from its retries for good.
func TestMDNSRetriesOutliveAFullQueue(t *testing.T) {
	n := &mdnsNotifee{ctx: t.Context(), queue: make(chan peer.AddrInfo, 1), tries: map[peer.ID]int{}, base: 10 * time.Millisecond}
	n.queue <- peer.AddrInfo{} // full, and no dialer takes from it
	for range mdnsMaxRetrying {
		n.retry(peer.AddrInfo{ID: testPeerID(t)})
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		n.mu.Lock()
		left := len(n.tries)
		n.mu.Unlock()
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d peers still hold retry slots after their retries", left)
		}
		time.Sleep(10 * time.Millisecond)
	}
	<-n.queue
	honest := peer.AddrInfo{ID: testPeerID(t)}
	n.retry(honest)
	select {
	case ai := <-n.queue:
		if ai.ID != honest.ID {
			t.Fatalf("queued %s, want the honest peer", ai.ID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the honest peer's retry never came")
	}
}
