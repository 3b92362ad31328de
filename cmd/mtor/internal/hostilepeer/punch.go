package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	holepb "github.com/libp2p/go-libp2p/p2p/protocol/holepunch/pb"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/punchtest"
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
		var addrs []ma.Multiaddr
		for _, s := range strings.Split(list, ",") {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				return fmt.Errorf("punch address %q: %w", s, err)
			}
			addrs = append(addrs, a)
		}
		msgs = append(msgs, punchtest.ConnectMsg(addrs...))
	}
	var once sync.Once
	h.Network().Notify(&network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		if c.Stat().Direction != network.DirInbound || !relayaddr.IsRelayed(c) {
			return
		}
		once.Do(func() {
			go func() {
				// A patient stranger: its identify has reached the node
				// first (the node asks on each new connection, as this
				// host does, so once this host's own is done a second
				// more), so that the node holds the addresses identify
				// listed when it punches.
				ids, ok := h.(interface{ IDService() identify.IDService })
				if !ok {
					fmt.Fprintln(os.Stderr, "punch: the host has no identify service to wait for")
					os.Exit(1)
				}
				select {
				case <-ids.IDService().IdentifyWait(c):
				case <-ctx.Done():
					return
				}
				time.Sleep(time.Second)
				for _, m := range msgs {
					if ctx.Err() != nil {
						return
					}
					verdict := "refused"
					// The node's libp2p serves punches once it has
					// found a public address: a minute for that.
					cctx, cancel := context.WithTimeout(ctx, time.Minute)
					if punchtest.ConnectAgain(cctx, h, c.RemotePeer(), m, 10*time.Second) {
						verdict = "answered"
					}
					cancel()
					fmt.Printf("connect: %s %s\n", c.RemotePeer(), verdict)
				}
			}()
		})
	}})
	return nil
}
