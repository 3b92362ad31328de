// Package punchtest sends hole-punch (DCUtR) messages as a stranger
// would, for the hostile tests: node's, and the NAT suite's hostile peer
// (cmd/mtor/internal/hostilepeer).
package punchtest

import (
	"context"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	holepb "github.com/libp2p/go-libp2p/p2p/protocol/holepunch/pb"
	"github.com/libp2p/go-msgio/pbio"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/protocol"
)

// exchangeTimeout bounds one CONNECT exchange; streamRetry is the wait
// between tries of a stream the peer does not serve yet, limitRetry that
// between tries of one it refused at its limit.
const (
	exchangeTimeout = 10 * time.Second
	streamRetry     = time.Second
	limitRetry      = 20 * time.Millisecond
)

// ConnectMsg is a CONNECT naming addrs.
func ConnectMsg(addrs ...ma.Multiaddr) *holepb.HolePunch {
	msg := &holepb.HolePunch{Type: holepb.HolePunch_CONNECT.Enum()}
	for _, a := range addrs {
		msg.ObsAddrs = append(msg.ObsAddrs, a.Bytes())
	}
	return msg
}

// Connect sends msg, a CONNECT, on a new hole-punch stream from h to p
// (over a relayed connection too) and reports whether p answered (it is
// sent SYNC then, and dials what its filter kept) and, if not, how the
// stream ended. A peer's libp2p serves the protocol only once it has
// found a public address: the stream is tried again, a second apart,
// until ctx ends.
func Connect(ctx context.Context, h host.Host, p peer.ID, msg *holepb.HolePunch) (bool, error) {
	var s network.Stream
	for {
		sctx, cancel := context.WithTimeout(network.WithAllowLimitedConn(ctx, "hostile punch"), exchangeTimeout)
		var err error
		s, err = h.NewStream(sctx, p, holepunch.Protocol)
		cancel()
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("open a hole-punch stream: %w", err)
		case <-time.After(streamRetry):
		}
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(exchangeTimeout))
	w, rd := pbio.NewDelimitedWriter(s), pbio.NewDelimitedReader(s, 4096)
	if err := w.WriteMsg(msg); err != nil {
		return false, err
	}
	var reply holepb.HolePunch
	if err := rd.ReadMsg(&reply); err != nil {
		return false, err // refused: the stream is reset
	}
	err := w.WriteMsg(&holepb.HolePunch{Type: holepb.HolePunch_SYNC.Enum()})
	return err == nil, err
}

// ConnectAgain is Connect, sent again for up to wait while p refuses the
// stream for its limit of hole-punch streams at a time (libp2p's 2 a
// peer, each until its punch ends): a stranger would, and so each of its
// messages meets p's own verdict. It reports whether p answered.
func ConnectAgain(ctx context.Context, h host.Host, p peer.ID, msg *holepb.HolePunch, wait time.Duration) bool {
	for deadline := time.Now().Add(wait); ; {
		answered, err := Connect(ctx, h, p, msg)
		if !protocol.RefusedAtLimit(err) || time.Now().After(deadline) {
			return answered
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(limitRetry):
		}
	}
}
