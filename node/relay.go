package node

import (
	"context"
	"slices"
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/discovery"
)

// relaySource feeds libp2p's autorelay with swarm peers that announce the
// relay role, so a worker behind NAT reserves a slot on one of the swarm's
// own relays (which carry whole answers, unlike the default limited relays)
// without any configuration. Autorelay asks only while the host believes
// it is not publicly reachable.
type relaySource struct {
	h    host.Host // set before disc is stored
	disc atomic.Pointer[discovery.Discovery]
}

func (rs *relaySource) peers(ctx context.Context, num int) <-chan peer.AddrInfo {
	ch := make(chan peer.AddrInfo, max(num, 0))
	defer close(ch)
	d := rs.disc.Load()
	if d == nil {
		return ch
	}
	ps := rs.h.Peerstore()
	for _, e := range d.Table().Snapshot() {
		if len(ch) == cap(ch) || ctx.Err() != nil {
			break
		}
		if e.Self || !slices.Contains(e.Announce.GetRoles(), "relay") {
			continue
		}
		if addrs := ps.Addrs(e.Peer); len(addrs) > 0 {
			ch <- peer.AddrInfo{ID: e.Peer, Addrs: addrs}
		}
	}
	return ch
}

// swarmOnlyACL makes our unlimited relay serve this swarm only: a peer may
// reserve a slot, or be relayed to someone, only once it has announced in
// the swarm (a signed announcement in our peer table). Without it an
// unlimited relay would carry anyone's traffic.
type swarmOnlyACL struct{ src *relaySource }

func (a swarmOnlyACL) member(p peer.ID) bool {
	d := a.src.disc.Load()
	if d == nil {
		return false
	}
	_, ok := d.Table().Get(p)
	return ok
}

func (a swarmOnlyACL) AllowReserve(p peer.ID, _ ma.Multiaddr) bool { return a.member(p) }

func (a swarmOnlyACL) AllowConnect(src peer.ID, _ ma.Multiaddr, dest peer.ID) bool {
	return a.member(src) && a.member(dest)
}
