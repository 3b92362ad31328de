package discovery

import (
	"context"
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"

	"github.com/mtor-swarm/mtor/node/relayaddr"
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
// so rounds never overlap however slow the peers are. The peers whose ping
// failed then have their connections suspected (WithSuspect), unless most
// of a round of several failed: the fault is then more likely ours (a
// starved process, our network gone) than theirs, and closing live
// connections would only make it worse.
func (d *Discovery) pingRound() {
	sem := make(chan struct{}, maxPingConcurrency)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		pinged int
		failed []peer.ID
	)
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
		pinged++
		wg.Add(1)
		go func(p peer.ID) {
			defer func() { <-sem; wg.Done() }()
			if rtt, relayed, ok := d.pingOnce(p); ok {
				d.table.setRTT(p, rtt, relayed)
				return
			}
			mu.Lock()
			failed = append(failed, p)
			mu.Unlock()
		}(e.Peer)
	}
	wg.Wait()
	if d.cfg.suspect == nil || len(failed) == 0 || d.ctx.Err() != nil {
		return
	}
	if pinged >= minPingsToBlameUs && 2*len(failed) > pinged {
		log.Infow("most pings of a round failed: not suspecting the peers' connections", "failed", len(failed), "pinged", pinged)
		return
	}
	for _, p := range failed {
		for _, c := range d.h.Network().ConnsToPeer(p) {
			d.cfg.suspect(c)
		}
	}
}

// minPingsToBlameUs is the smallest round in which most pings failing
// says more about us than about the peers.
const minPingsToBlameUs = 4

// pingOnce sends one ping and says whether it went through a relay: the
// ping takes the connection queries take (libp2p's best: a direct one
// before a relayed one). The table smooths the samples per path, which
// the peerstore's EWMA (one for all paths) cannot.
func (d *Discovery) pingOnce(p peer.ID) (rtt time.Duration, relayed bool, ok bool) {
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.pingTimeout)
	defer cancel()
	relayed = !hasDirectConn(d.h.Network().ConnsToPeer(p))
	res, ok := <-ping.Ping(ctx, d.h, p)
	if !ok || res.Error != nil {
		if ok && d.ctx.Err() == nil {
			log.Debugw("ping failed", "peer", p, "err", res.Error)
		}
		return 0, false, false
	}
	return res.RTT, relayed, true
}

// hasDirectConn reports whether one of conns does not run through a relay.
func hasDirectConn(conns []network.Conn) bool {
	for _, c := range conns {
		if !relayaddr.IsRelayed(c) {
			return true
		}
	}
	return false
}
