package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	holepb "github.com/libp2p/go-libp2p/p2p/protocol/holepunch/pb"
	"github.com/libp2p/go-msgio/pbio"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// reserve takes a reservation on each relay (comma-separated /p2p/
// multiaddrs) and returns the circuit addresses that reach this host
// through them: a volunteer behind NAT announces these.
func reserve(ctx context.Context, h host.Host, relays string) ([]ma.Multiaddr, error) {
	var circuits []ma.Multiaddr
	for _, s := range strings.Split(relays, ",") {
		ai, err := peer.AddrInfoFromString(s)
		if err != nil {
			return nil, fmt.Errorf("relay %q: %w", s, err)
		}
		rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		if err := h.Connect(rctx, *ai); err != nil {
			cancel()
			return nil, fmt.Errorf("relay %s: %w", ai.ID, err)
		}
		_, err = client.Reserve(rctx, h, *ai)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("reservation on %s: %w", ai.ID, err)
		}
		for _, a := range ai.Addrs {
			circuits = append(circuits, a.Encapsulate(ma.StringCast("/p2p/"+ai.ID.String()+"/p2p-circuit")))
		}
	}
	return circuits, nil
}

// punchOnCircuits answers the first circuit dialed to this host with
// hole-punch CONNECT messages of its own making, one per list in connects
// (each a comma-separated multiaddr list), as the end that receives a
// circuit starts a punch: go-libp2p's responder dials the addresses it
// keeps of them. It prints "connect: PEER answered" or "connect: PEER
// refused" for each. (The first circuit only: a dial through two relays
// at once may open two.)
func punchOnCircuits(ctx context.Context, h host.Host, connects []string) error {
	var msgs []*holepb.HolePunch
	for _, list := range connects {
		msg := &holepb.HolePunch{Type: holepb.HolePunch_CONNECT.Enum()}
		for _, s := range strings.Split(list, ",") {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				return fmt.Errorf("punch address %q: %w", s, err)
			}
			msg.ObsAddrs = append(msg.ObsAddrs, a.Bytes())
		}
		msgs = append(msgs, msg)
	}
	var once sync.Once
	h.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		if c.Stat().Direction != network.DirInbound || !relayaddr.IsRelayed(c) {
			return
		}
		once.Do(func() {
			go func() {
				for _, m := range msgs {
					if ctx.Err() != nil {
						return
					}
					verdict := "refused"
					if connectAgain(ctx, h, c.RemotePeer(), m) {
						verdict = "answered"
					}
					fmt.Printf("connect: %s %s\n", c.RemotePeer(), verdict)
				}
			}()
		})
	}})
	return nil
}

// connectAgain is connect, sent again while p refuses the stream for
// its limit of hole-punch streams at a time (libp2p's 2 a peer, each
// until its punch ends): a stranger would, and so each of its messages
// meets p's own verdict.
func connectAgain(ctx context.Context, h host.Host, p peer.ID, msg *holepb.HolePunch) bool {
	for deadline := time.Now().Add(10 * time.Second); ; {
		answered, err := connect(ctx, h, p, msg)
		var serr *network.StreamError
		if !errors.As(err, &serr) || !serr.Remote || serr.ErrorCode != network.StreamResourceLimitExceeded || time.Now().After(deadline) {
			return answered
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// connect sends msg on a new hole-punch stream to p over its circuit and
// reports whether p answered (it is sent SYNC then, and dials), and if
// not, how the stream ended. The peer's hole-punch service serves once
// it has found a public address: the stream is tried again for a while
// until it does.
func connect(ctx context.Context, h host.Host, p peer.ID, msg *holepb.HolePunch) (bool, error) {
	var s network.Stream
	for deadline := time.Now().Add(30 * time.Second); ; {
		sctx, cancel := context.WithTimeout(network.WithAllowLimitedConn(ctx, "hostile punch"), 10*time.Second)
		var err error
		s, err = h.NewStream(sctx, p, holepunch.Protocol)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return false, err
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(time.Second):
		}
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(10 * time.Second))
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
