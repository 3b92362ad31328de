package discovery

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"

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

	mu    sync.Mutex
	tries map[peer.ID]int // failed dials of peers waiting for a retry
	base  time.Duration   // the first retry's back-off (1 s; tests shorten it)
}

// mdnsRetries bounds the dials again of a peer mDNS found but a dial did
// not reach (a machine busy starting, a dial timeout): mDNS reports a
// peer once, until its record expires, so without them the two nodes
// could stay apart for an hour. They come 1, 2, 4 and 8 s after the
// failures, for at most mdnsMaxRetrying peers at a time.
const (
	mdnsRetries     = 4
	mdnsMaxRetrying = 256
)

// retry queues ai again after a back-off, unless it has had its tries or
// too many peers are waiting.
func (n *mdnsNotifee) retry(ai peer.AddrInfo) {
	n.mu.Lock()
	k, waiting := n.tries[ai.ID]
	if k >= mdnsRetries || (!waiting && len(n.tries) >= mdnsMaxRetrying) {
		delete(n.tries, ai.ID)
		n.mu.Unlock()
		return
	}
	n.tries[ai.ID] = k + 1
	n.mu.Unlock()
	time.AfterFunc(n.base<<k, func() { n.requeue(ai) })
}

// requeue hands a peer due for a retry to the dialers. With their queue
// full it waits its next back-off, as after a failed dial: its entry in
// tries then ends with its retries, and peers dropped by a full queue
// cannot hold every retry slot for good.
func (n *mdnsNotifee) requeue(ai peer.AddrInfo) {
	select {
	case n.queue <- ai:
	case <-n.ctx.Done():
	default:
		n.retry(ai)
	}
}

// connected forgets ai's failed dials.
func (n *mdnsNotifee) connected(id peer.ID) {
	n.mu.Lock()
	delete(n.tries, id)
	n.mu.Unlock()
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
	n := d.startMDNSDialers()
	svc := mdns.NewMdnsService(d.h, MDNSServiceName(d.cfg.swarm), n)
	if err := svc.Start(); err != nil {
		_ = svc.Close()
		return nil, err
	}
	log.Infow("mDNS started", "service", MDNSServiceName(d.cfg.swarm))
	return svc, nil
}

// startMDNSDialers starts the dialers of the peers mDNS finds, and
// returns what the mDNS service reports them to.
func (d *Discovery) startMDNSDialers() *mdnsNotifee {
	n := &mdnsNotifee{ctx: d.ctx, queue: make(chan peer.AddrInfo, mdnsQueue), tries: map[peer.ID]int{}, base: time.Second}
	for range mdnsDialWorkers {
		d.goRun(func() { d.mdnsDialer(n) })
	}
	return n
}

func (d *Discovery) mdnsDialer(n *mdnsNotifee) {
	for {
		select {
		case <-d.ctx.Done():
			return
		case ai := <-n.queue:
			if ai.ID == d.h.ID() || d.h.Network().Connectedness(ai.ID) == network.Connected {
				n.connected(ai.ID)
				continue
			}
			// Connect, not the host's: it clears the back-off of the
			// failed dial before a retry, and fails on a connection the
			// peer refused right after the handshake (QUIC).
			ctx, cancel := context.WithTimeout(d.ctx, d.cfg.dialTimeout)
			err := Connect(ctx, d.h, ai)
			cancel()
			if err != nil {
				log.Debugw("mDNS peer unreachable", "peer", ai.ID, "err", err)
				n.retry(ai)
				continue
			}
			n.connected(ai.ID)
			log.Infow("connected to mDNS peer", "peer", ai.ID)
		}
	}
}
