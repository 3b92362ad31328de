package hostiletest

import (
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// Refuser is the connection gater of a peer that refuses inbound
// connections at accept, as many as Refuse says. On TCP that is before
// the handshake, and the dial fails. On QUIC the dialler's handshake is
// complete by then: its Connect succeeds and the connection dies a moment
// later. It lets every other connection through.
type Refuser struct {
	left    atomic.Int64 // refusals to come; < 0: every connection
	refused atomic.Int64
}

// Refuse arms the next n refusals; n < 0 refuses every connection.
func (g *Refuser) Refuse(n int64) { g.left.Store(n) }

// Refused counts the connections refused so far.
func (g *Refuser) Refused() int64 { return g.refused.Load() }

func (g *Refuser) InterceptAccept(network.ConnMultiaddrs) bool {
	for {
		n := g.left.Load()
		switch {
		case n == 0:
			return true
		case n < 0 || g.left.CompareAndSwap(n, n-1):
			g.refused.Add(1)
			return false
		}
	}
}

func (*Refuser) InterceptPeerDial(peer.ID) bool               { return true }
func (*Refuser) InterceptAddrDial(peer.ID, ma.Multiaddr) bool { return true }
func (*Refuser) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (*Refuser) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}
