package discovery

import (
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// tableTag protects, in the connection manager, the connections to the
// peers the table holds. The table drops a peer when its last connection
// closes (that is how a killed worker leaves within milliseconds), so
// without it the manager's trimming (384 connections, node/host.go) would
// also trim the view: a bridge of a swarm of 500 workers would show and
// route to about 384. The table is bounded (WithMaxEntries, and per model
// without the swarm view), so the protected connections are too; trimming
// still closes the others (DHT look-ups, peers in quarantine).
const tableTag = "mtor-table"

// reprotectEvery reconciles the protections with the table, for events a
// slow subscriber missed (the table never blocks on its subscribers).
const reprotectEvery = 30 * time.Second

// protectLoop keeps tableTag on exactly the peers of the table.
func (d *Discovery) protectLoop() {
	cm := d.h.ConnManager()
	ch, cancel := d.table.Subscribe(maxSubscriberBuf)
	defer cancel()
	tick := time.NewTicker(reprotectEvery)
	defer tick.Stop()
	held := map[peer.ID]bool{}
	set := func(p peer.ID, on bool) {
		if p == d.h.ID() || held[p] == on {
			return
		}
		if on {
			held[p] = true
			cm.Protect(p, tableTag)
			return
		}
		delete(held, p)
		cm.Unprotect(p, tableTag)
	}
	reconcile := func() {
		in := map[peer.ID]bool{}
		for _, e := range d.table.Snapshot() {
			in[e.Peer] = true
			set(e.Peer, true)
		}
		for p := range held {
			if !in[p] {
				set(p, false)
			}
		}
	}
	reconcile()
	for {
		select {
		case <-d.ctx.Done():
			return
		case ev, ok := <-ch:
			if !ok {
				return
			}
			switch ev.Kind {
			case Join:
				set(ev.Peer, true)
			case Leave:
				set(ev.Peer, false)
			}
		case <-tick.C:
			reconcile()
		}
	}
}
