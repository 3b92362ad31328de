package node

import (
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
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
	mu    sync.Mutex
	sent  map[peer.ID]punchNote
	now   func() time.Time
	bound int
}

// punchNote is what we last sent a peer in a punch: the kinds of our
// direct addresses in it, and when.
type punchNote struct {
	kinds addrKinds
	at    time.Time
}

func newPunchFilter() *punchFilter {
	return &punchFilter{sent: map[peer.ID]punchNote{}, now: time.Now, bound: maxPunched}
}

// FilterLocal notes the kinds of the addresses we send p; they all go, so
// that p can decide as we do. A note is overwritten, not consumed: punches
// with p in both directions at once send the same addresses.
func (f *punchFilter) FilterLocal(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	if _, ok := f.sent[p]; !ok && len(f.sent) >= f.bound {
		for q, n := range f.sent {
			if now.Sub(n.at) > holepunch.StreamTimeout {
				delete(f.sent, q)
			}
		}
		if len(f.sent) >= f.bound {
			return addrs // past the bound of punches under way: this one dials all
		}
	}
	f.sent[p] = punchNote{kinds: kindsOf(addrs), at: now}
	return addrs
}

// FilterRemote keeps p's addresses of the first kind both ends sent.
// libp2p calls it after FilterLocal on the same stream, at either end,
// within the stream's deadline.
func (f *punchFilter) FilterRemote(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	f.mu.Lock()
	n, ok := f.sent[p]
	f.mu.Unlock()
	if !ok || f.now().Sub(n.at) > holepunch.StreamTimeout {
		return addrs
	}
	common := n.kinds & kindsOf(addrs)
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
