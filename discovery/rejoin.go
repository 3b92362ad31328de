package discovery

import (
	"context"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
)

// Gossip repair. A peer that restarts (same peer ID, new process) while we
// still hold a connection to its old process (QUIC, or a vanished machine:
// nothing reset it) finds our gossipsub writer bound to that dead
// connection: gossipsub ignores the new connection because it already has
// a writer for the peer, and once the old connection dies it respawns the
// writer with a back-off that gives up after four tries in ten minutes
// (go-libp2p-pubsub's MaxBackoffAttempts). From then on we send that peer
// nothing, so it never learns that we subscribe to the announce topic,
// and its announcements — published only to known topic peers — never
// reach us: a healthy worker, connected to us, is missing from our table.
// A peer that drops one connection and dials a new one at once does the
// same to us, one time in about 40 on loopback: its new connection's
// hello (its subscriptions) can cross before our gossipsub has handled
// the old connection's writer dying, and that handling then forgets all
// the peer's subscriptions, while the new connection stays up. The peer
// still subscribes to its topics; we send it nothing on them.
//
// So every node checks its connected swarm members: one connected for a
// while that is not among the peers of the presence topic (which every node
// joins, whatever it announces or reads) has a broken gossip link,
// and we connect to it afresh. A new connection of a peer that gossipsub
// no longer tracks gets a new writer at once, with no back-off. So does a
// connected peer whose identify failed (a loaded machine: the exchange
// has 5 s): gossipsub adds peers only on identify, so that link carries
// no gossip either way, and without its protocols we cannot tell it is a
// member. Closing the connections ends the query streams on them, so a
// repair waits while this node has queries in flight with the peer
// (WithBusy), rejoinBusyMax at most.
const (
	rejoinCheckInterval = time.Second
	// rejoinGrace is how long a new connection has to show the peer in
	// the topic: gossipsub's hello crosses within a round trip.
	rejoinGrace = 3 * time.Second
	// rejoinEvery bounds repairs of one peer.
	rejoinEvery = 30 * time.Second
	// rejoinPause lets gossipsub see the peer gone before it comes back.
	rejoinPause = 250 * time.Millisecond
	// rejoinDials bounds the dials of one repair, rejoinRetry, 2 ×
	// rejoinRetry, … apart: up to about a minute with the dial timeout,
	// past a QUIC connection's idle timeout (30 s), since three dials in
	// about 33 s once all failed on QUIC on a loaded machine.
	rejoinDials = 5
	rejoinRetry = time.Second
	// maxUnidentified bounds the connected peers whose identify failed
	// that wait for a repair.
	maxUnidentified = 1024
	// rejoinBusyMax bounds how long a repair waits for the queries this
	// node has in flight with the peer, either way (WithBusy): they would
	// die with its connections, and they are often on a connection that
	// works (a restarted worker's new one, while gossipsub still lacks
	// its hello). Past it the repair goes ahead: a link broken for good
	// keeps the peer's gossip away.
	rejoinBusyMax = 30 * time.Second
	// maxRepairs bounds the repairs under way at once; the others wait
	// for a later check. After a stall (a loaded machine, identify
	// failing on hundreds of connections at once) a node with many
	// peers, a swarm view above all, would otherwise close and redial
	// them all together: in a simulated swarm of 500 that dial storm
	// kept the views' gossipsub waiting for minutes.
	maxRepairs = 8
)

// rejoinLoop repairs broken gossip links until the discovery closes.
func (d *Discovery) rejoinLoop() {
	t := time.NewTicker(rejoinCheckInterval)
	defer t.Stop()
	// A peer whose identify failed is one gossipsub never adds (it adds
	// peers when identify reports their protocols), and one whose
	// protocols we do not know: without this, member would never say
	// it should gossip with us.
	idSub, err := d.h.EventBus().Subscribe(new(event.EvtPeerIdentificationFailed), eventbus.BufSize(connEventBuffer), eventbus.Name("mtor/discovery rejoin"))
	if err != nil {
		log.Warnw("gossip-link repair does not see identify failures", "err", err)
	} else {
		defer idSub.Close()
	}
	var idFailed <-chan any
	if idSub != nil {
		idFailed = idSub.Out()
	}
	unidentified := map[peer.ID]bool{}
	last := map[peer.ID]time.Time{}
	// busySince: when a broken link's repair first waited for the
	// peer's queries; only peers whose repair is waiting.
	busySince := map[peer.ID]time.Time{}
	repairs := make(chan struct{}, maxRepairs)
	repair := d.rejoin
	if d.cfg.repair != nil {
		repair = d.cfg.repair
	}
	for {
		select {
		case <-d.ctx.Done():
			return
		case e := <-idFailed:
			if ev, ok := e.(event.EvtPeerIdentificationFailed); ok && len(unidentified) < maxUnidentified {
				unidentified[ev.Peer] = true
			}
			continue
		case <-t.C:
		}
		now := time.Now()
		for p, at := range last {
			if now.Sub(at) > rejoinEvery {
				delete(last, p)
			}
		}
		inTopic := map[peer.ID]bool{}
		for _, p := range d.presence.ListPeers() {
			inTopic[p] = true
		}
		for p := range unidentified {
			if d.h.Network().Connectedness(p) != network.Connected || d.member(p) {
				delete(unidentified, p) // gone, or identified since
			}
		}
		waiting := busySince
		busySince = map[peer.ID]time.Time{}
		for _, p := range d.h.Network().Peers() {
			if inTopic[p] || !last[p].IsZero() || !(d.member(p) || unidentified[p]) || !settled(d.h.Network().ConnsToPeer(p), now) {
				continue
			}
			if d.cfg.busy != nil && d.cfg.busy(p) {
				since, ok := waiting[p]
				if !ok {
					since = now
				}
				// Kept past busyMax too: a repair put off for want of
				// a slot does not wait all over again.
				busySince[p] = since
				if now.Sub(since) < d.cfg.busyMax {
					continue
				}
			}
			select {
			case repairs <- struct{}{}:
			default:
				continue // enough under way: at a later check
			}
			last[p] = now
			delete(unidentified, p)
			log.Infow("reconnecting a swarm member whose gossip link is broken", "peer", p)
			d.goRun(func() {
				defer func() { <-repairs }()
				repair(p)
			})
		}
	}
}

// member reports whether p speaks the protocol every node of the swarm
// serves: a peer of the swarm that should gossip with us.
func (d *Discovery) member(p peer.ID) bool {
	ps, err := d.h.Peerstore().SupportsProtocols(p, d.cfg.memberProto)
	return err == nil && len(ps) > 0
}

// settled reports whether the peer's newest connection is older than the
// grace: long enough for gossipsub's hello to have crossed it.
func settled(conns []network.Conn, now time.Time) bool {
	if len(conns) == 0 {
		return false
	}
	for _, c := range conns {
		if now.Sub(c.Stat().Opened) < rejoinGrace || c.Stat().Limited {
			return false
		}
	}
	return true
}

// rejoin closes our connections to p and dials it again, a few times if
// it must: nothing else may dial it back (the DHT rarely does in a large
// swarm), so one dial that fails under load would leave a member that
// was connected a moment ago out of our table for good.
func (d *Discovery) rejoin(p peer.ID) {
	addrs := d.h.Peerstore().Addrs(p)
	_ = d.h.Network().ClosePeer(p)
	pause := rejoinPause
	for try := 1; ; try++ {
		select {
		case <-d.ctx.Done():
			return
		case <-time.After(pause):
		}
		if try > 1 && d.h.Network().Connectedness(p) == network.Connected {
			return // it dialled us meanwhile
		}
		ctx, cancel := context.WithTimeout(d.ctx, d.cfg.dialTimeout)
		err := Connect(ctx, d.h, peer.AddrInfo{ID: p, Addrs: addrs})
		cancel()
		if err == nil || d.ctx.Err() != nil {
			return
		}
		if try == rejoinDials {
			log.Infow("reconnecting a swarm member failed", "peer", p, "tries", try, "err", err.Error())
			return
		}
		log.Debugw("reconnecting a swarm member: dial failed, trying again", "peer", p, "err", err.Error())
		pause = time.Duration(try) * rejoinRetry
	}
}
