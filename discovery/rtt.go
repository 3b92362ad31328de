package discovery

import (
	"context"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
)

// pingLoop measures the RTT to every connected peer of the table once per
// ping interval. Peers we are not connected to are skipped: dialling every
// announcer just to time it would cost a connection each in a large swarm;
// the router's own dial will connect when it needs the peer.
func (d *Discovery) pingLoop() {
	t := time.NewTicker(d.cfg.pingInterval)
	defer t.Stop()
	for {
		d.pingRound()
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// pingRound pings with bounded concurrency and waits for the round to end,
// so rounds never overlap however slow the peers are.
func (d *Discovery) pingRound() {
	sem := make(chan struct{}, maxPingConcurrency)
	var wg sync.WaitGroup
	for _, e := range d.table.Snapshot() {
		if e.Self || d.h.Network().Connectedness(e.Peer) != network.Connected {
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-d.ctx.Done():
			wg.Wait()
			return
		}
		wg.Add(1)
		go func(p peer.ID) {
			defer func() { <-sem; wg.Done() }()
			if rtt, ok := d.pingOnce(p); ok {
				d.table.setRTT(p, rtt)
			}
		}(e.Peer)
	}
	wg.Wait()
}

// pingOnce sends one ping. The ping service records each sample in the
// peerstore's EWMA; we report that smoothed value, which routes better
// than one noisy sample.
func (d *Discovery) pingOnce(p peer.ID) (time.Duration, bool) {
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.pingTimeout)
	defer cancel()
	res, ok := <-ping.Ping(ctx, d.h, p)
	if !ok || res.Error != nil {
		if ok && d.ctx.Err() == nil {
			log.Debugw("ping failed", "peer", p, "err", res.Error)
		}
		return 0, false
	}
	if ewma := d.h.Peerstore().LatencyEWMA(p); ewma > 0 {
		return ewma, true
	}
	return res.RTT, true
}
