package discovery

import (
	"context"
	"errors"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
)

// ErrClosedAtOnce is a dial whose connection the peer closed before it
// could be used: it refused us after the handshake.
var ErrClosedAtOnce = errors.New("the connection closed right after the handshake")

// Connect dials ai like host.Connect, and fails with ErrClosedAtOnce
// where the connection it got is no use. host.Connect waits for
// identify, which fails on a connection the peer closed right after its
// handshake: on QUIC the dialler's handshake completes before the
// listener may refuse it (a gater, connection limits), and Connect
// returns nil. A relayed connection counts as open. A dial that meets
// the swarm's dial back-off (a dial to the peer failed moments ago: ours,
// or another part of the node's) clears it and dials once more: whoever
// calls Connect waits and backs off itself.
func Connect(ctx context.Context, h host.Host, ai peer.AddrInfo) error {
	err := h.Connect(ctx, ai)
	if errors.Is(err, swarm.ErrDialBackoff) {
		ClearDialBackoff(h, ai.ID)
		err = h.Connect(ctx, ai)
	}
	if err != nil {
		return err
	}
	// Connect may have returned on a connection another dial opened,
	// before that one's identify ended.
	if ids, ok := h.(interface{ IDService() identify.IDService }); ok {
		for _, c := range h.Network().ConnsToPeer(ai.ID) {
			select {
			case <-ids.IDService().IdentifyWait(c):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	// A connection closing may not say so yet; a failed identify leaves
	// the peer's protocols unknown (unless a past connection learnt them).
	if protos, _ := h.Peerstore().GetProtocols(ai.ID); len(protos) == 0 || !hasOpenConn(h.Network(), ai.ID) {
		return ErrClosedAtOnce
	}
	return nil
}

// hasOpenConn says whether some connection to p is still open: a closed
// one may not have left the swarm's list yet.
func hasOpenConn(nw network.Network, p peer.ID) bool {
	for _, c := range nw.ConnsToPeer(p) {
		if !c.IsClosed() {
			return true
		}
	}
	return false
}

// ClearDialBackoff forgets the swarm's dial back-off for p: the failed
// dial of another part of the node must not fail a dial that has its own
// reason and its own pacing.
func ClearDialBackoff(h host.Host, p peer.ID) {
	if sw, ok := h.Network().(*swarm.Swarm); ok {
		sw.Backoff().Clear(p)
	}
}
