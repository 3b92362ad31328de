package node

import (
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// punchFilter makes both ends of a hole punch dial one transport.
//
// In a punch (DCUtR) each end dials every address the other sent, TCP
// and QUIC at once, and libp2p closes a dial that completes after the
// first one to that peer succeeded (go-libp2p v0.51, swarm/limiter.go).
// When the ends' first successes differ (one end's QUIC connection is up
// first, the other's TCP one), each closes the connection the other kept
// and the pair has none: in the NAT suite both punched connections were
// gone within 2 ms, and the pair stayed on its relay until the next
// punch. So when both ends sent QUIC addresses both dial only those (a
// UDP hole is the likelier to open); otherwise both dial all. Each end
// decides from the same two sets (what it sent, what it received), so
// they agree without a word more. A peer without this rule dials all;
// its TCP dial then fails at our NAT (we send no SYN to meet it) or
// lands in our listener, and an accepted connection is never closed so.
type punchFilter struct {
	mu   sync.Mutex
	sent map[peer.ID]bool // whether our addresses in the punch under way held QUIC
}

func newPunchFilter() *punchFilter { return &punchFilter{sent: map[peer.ID]bool{}} }

// FilterLocal notes whether the addresses we send p hold a QUIC one; they
// all go, so that p can decide as we do.
func (f *punchFilter) FilterLocal(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.sent) >= maxPunched {
		// Punches that ended before their CONNECT came back; the bound
		// costs at most one punch dialing all.
		clear(f.sent)
	}
	f.sent[p] = hasQUIC(addrs)
	return addrs
}

// FilterRemote keeps p's QUIC addresses alone when both ends sent some.
// libp2p calls it after FilterLocal on the same stream, at either end.
func (f *punchFilter) FilterRemote(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	f.mu.Lock()
	sentQUIC, ok := f.sent[p]
	delete(f.sent, p)
	f.mu.Unlock()
	if !ok || !sentQUIC || !hasQUIC(addrs) {
		return addrs
	}
	out := make([]ma.Multiaddr, 0, len(addrs))
	for _, a := range addrs {
		if isQUICAddr(a) {
			out = append(out, a)
		}
	}
	return out
}

func hasQUIC(addrs []ma.Multiaddr) bool {
	for _, a := range addrs {
		if isQUICAddr(a) {
			return true
		}
	}
	return false
}

// isQUICAddr reports a plain, direct QUIC address: not WebTransport over
// it (mtor does not listen on that), and not a relay's. The responding
// end's libp2p hands its filter its relayed addresses too, which the
// other end drops before its own.
func isQUICAddr(a ma.Multiaddr) bool {
	if _, err := a.ValueForProtocol(ma.P_QUIC_V1); err != nil {
		return false
	}
	if _, err := a.ValueForProtocol(ma.P_WEBTRANSPORT); err == nil {
		return false
	}
	return !relayaddr.IsCircuit(a)
}
