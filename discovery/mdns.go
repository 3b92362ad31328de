package discovery

import (
	"context"
	"crypto/sha256"
	"encoding/hex"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"

	"github.com/mtor-swarm/mtor/protocol"
)

// MDNSServiceName is the DNS-SD service a swarm advertises on the LAN.
// The default swarm uses "_mtor._udp"; another swarm a hash of its name,
// because a DNS-SD service label is limited to 15 characters and swarm
// names may be 32.
func MDNSServiceName(swarm string) string {
	if swarm == "" || swarm == protocol.DefaultSwarm {
		return "_mtor._udp"
	}
	sum := sha256.Sum256([]byte(swarm))
	return "_mtor-" + hex.EncodeToString(sum[:4]) + "._udp"
}

// mdnsNotifee queues found peers for a fixed pool of dialers. The mDNS
// service calls HandlePeerFound in a new goroutine per answer, so it must
// return at once; when the queue is full the peer is dropped, and found
// again on the next mDNS answer.
type mdnsNotifee struct {
	ctx   context.Context
	queue chan peer.AddrInfo
}

func (n *mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) {
	select {
	case n.queue <- ai:
	case <-n.ctx.Done():
	default:
		log.Debugw("mDNS dial queue full; dropping", "peer", ai.ID)
	}
}

func (d *Discovery) startMDNS() (interface{ Close() error }, error) {
	n := &mdnsNotifee{ctx: d.ctx, queue: make(chan peer.AddrInfo, mdnsQueue)}
	for range mdnsDialWorkers {
		d.goRun(func() { d.mdnsDialer(n.queue) })
	}
	svc := mdns.NewMdnsService(d.h, MDNSServiceName(d.cfg.swarm), n)
	if err := svc.Start(); err != nil {
		_ = svc.Close()
		return nil, err
	}
	log.Infow("mDNS started", "service", MDNSServiceName(d.cfg.swarm))
	return svc, nil
}

func (d *Discovery) mdnsDialer(queue <-chan peer.AddrInfo) {
	for {
		select {
		case <-d.ctx.Done():
			return
		case ai := <-queue:
			if ai.ID == d.h.ID() || d.h.Network().Connectedness(ai.ID) == network.Connected {
				continue
			}
			ctx, cancel := context.WithTimeout(d.ctx, d.cfg.dialTimeout)
			err := d.h.Connect(ctx, ai)
			cancel()
			if err != nil {
				log.Debugw("mDNS peer unreachable", "peer", ai.ID, "err", err)
				continue
			}
			log.Infow("connected to mDNS peer", "peer", ai.ID)
		}
	}
}
