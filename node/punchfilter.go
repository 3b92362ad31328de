package node

import (
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// punchFilter makes both ends of a hole punch dial one kind of address.
//
// In a punch (DCUtR) each end dials every address the other sent, TCP
// and QUIC, IPv4 and IPv6, at once, and libp2p closes a dial that
// completes after the first one to that peer succeeded (go-libp2p v0.51,
// swarm/limiter.go). When the ends' first successes differ (one end's
// QUIC connection is up first, the other's TCP one), each closes the
// connection the other kept and the pair has none: in the NAT suite both
// punched connections were gone within 2 ms, and the pair stayed on its
// relay until the next punch. So both ends dial only the first kind, of
// QUIC over IPv4, QUIC over IPv6, TCP over IPv4 and TCP over IPv6 (a UDP
// hole is the likelier to open), that both sent; with none in common,
// all. Each end decides from the same two sets (what it sent, what it
// received), so they agree without a word more. Several addresses of
// that one kind (a NAT with more than one public address) are still
// dialed together. A peer without this rule dials all; its other dials
// fail at our NAT (we send nothing to meet them) or land in our
// listener, and an accepted connection is never closed so.
type punchFilter struct {
	// sent is the kinds of the direct addresses we last sent in a punch
	// (none before the first: then all are dialed). libp2p hands
	// FilterLocal our hole-punch addresses whatever the peer, so one
	// value serves every punch, in either direction, with no note per
	// peer to bound.
	sent atomic.Uint32
}

func newPunchFilter() *punchFilter { return &punchFilter{} }

// FilterLocal notes the kinds of the addresses we send; they all go, so
// that the peer can decide as we do.
func (f *punchFilter) FilterLocal(_ peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	f.sent.Store(uint32(kindsOf(addrs)))
	return addrs
}

// FilterRemote keeps the peer's addresses of the first kind both ends
// sent. libp2p calls it after FilterLocal on the same stream, at either
// end.
func (f *punchFilter) FilterRemote(_ peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	common := addrKinds(f.sent.Load()) & kindsOf(addrs)
	if common == 0 {
		return addrs
	}
	pick := common & -common // the first kind, in addrKind's order
	out := make([]ma.Multiaddr, 0, len(addrs))
	for _, a := range addrs {
		if kindOf(a) == pick {
			out = append(out, a)
		}
	}
	return out
}

// addrKinds is a set of address kinds, each a bit in order of preference.
type addrKinds uint8

const (
	kindQUIC4 addrKinds = 1 << iota
	kindQUIC6
	kindTCP4
	kindTCP6
)

func kindsOf(addrs []ma.Multiaddr) addrKinds {
	var k addrKinds
	for _, a := range addrs {
		k |= kindOf(a)
	}
	return k
}

// kindOf is a direct address's kind, 0 for another (a relay's: the
// answering end's libp2p hands its filter its relayed addresses too,
// which the other end drops before its own; WebTransport, which mtor does
// not listen on).
func kindOf(a ma.Multiaddr) addrKinds {
	if relayaddr.IsCircuit(a) {
		return 0
	}
	has := func(code int) bool { _, err := a.ValueForProtocol(code); return err == nil }
	var four bool
	switch {
	case has(ma.P_IP4):
		four = true
	case has(ma.P_IP6):
	default:
		return 0 // a DNS name: resolved later, its family unknown here
	}
	switch {
	case has(ma.P_QUIC_V1) && !has(ma.P_WEBTRANSPORT):
		if four {
			return kindQUIC4
		}
		return kindQUIC6
	case has(ma.P_TCP):
		if four {
			return kindTCP4
		}
		return kindTCP6
	}
	return 0
}
