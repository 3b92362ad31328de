package node

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// maxPunched bounds the hole-punched connections remembered: each entry
// leaves when its connection closes; past the bound the oldest go.
// It bounds the punches under way, too.
const maxPunched = 4096

// punchGrace is how long after a punch attempt ends a new direct
// connection to that peer still counts as the punch's: the other side's
// dial of a simultaneous open may land after our own attempt gave up.
const punchGrace = 10 * time.Second

// punchLead is how long before our punch's start a connection may open
// and still be the punch's: the peer starts its dial when our SYNC
// reaches it, which our half-RTT wait only estimates.
const punchLead = time.Second

// punchLog remembers which direct connections a hole punch (DCUtR) made,
// so that the peer views can say "direct after hole punch" rather than
// only "direct". It is libp2p's hole-punch tracer and a network notifiee.
type punchLog struct {
	hv atomic.Pointer[host.Host]

	mu    sync.Mutex
	conns map[string]peer.ID // connection ID -> peer
	order []string           // insertion order, for the bound
	tries map[peer.ID]punchTry
	now   func() time.Time
	// also is told every event too, once attach sets it: node/repunch
	// holds its tries off while the routers remember a failed punch.
	also atomic.Pointer[holepunch.EventTracer]
}

// punchTry is a hole punch with a peer: when it started (less
// punchLead) and, once it ended, until when it may still be the origin of
// a new connection.
type punchTry struct{ start, until time.Time }

func newPunchLog() *punchLog {
	return &punchLog{conns: map[string]peer.ID{}, tries: map[peer.ID]punchTry{}, now: time.Now}
}

// attach starts following h's connections, and hands every hole-punch
// event on to also; call once h exists.
func (l *punchLog) attach(h host.Host, also holepunch.EventTracer) {
	l.hv.Store(&h)
	l.also.Store(&also)
	h.Network().Notify(&network.NotifyBundle{
		ConnectedF: func(_ network.Network, c network.Conn) { l.connected(c) },
		DisconnectedF: func(_ network.Network, c network.Conn) {
			if l.forget(c.ID()) {
				// The pair is back on its relay until the next punch
				// (node/repunch): why the punch did not last is the
				// NATs' or the path's, and the lifetime says which.
				log.Infow("hole-punched connection closed", "peer", c.RemotePeer(), "lived", time.Since(c.Stat().Opened).Round(time.Millisecond), "transport", c.ConnState().Transport)
			}
		},
	})
}

// Trace is called by libp2p's hole-punch service on both sides of a punch.
//
// Either side's dial may make the connection: when ours fails (or our
// retry finds the stream refused because the peer's dial already made a
// direct connection) the peer's may have succeeded. So a direct
// connection to the peer that opens after a punch started, and until
// punchGrace after it ended, counts as punched too, not only the ones
// standing when our own attempt reports success.
func (l *punchLog) Trace(evt *holepunch.Event) {
	if also := l.also.Load(); also != nil && *also != nil {
		(*also).Trace(evt)
	}
	switch e := evt.Evt.(type) {
	case *holepunch.StartHolePunchEvt:
		l.started(evt.Remote)
	case *holepunch.EndHolePunchEvt:
		if e.Success {
			log.Infow("hole punch: direct connection", "peer", evt.Remote, "after", e.EllapsedTime)
		} else {
			// Info: the pair stays relayed until node/repunch tries again.
			log.Infow("hole punch failed", "peer", evt.Remote, "after", e.EllapsedTime, "err", e.Error)
		}
		l.ended(evt.Remote, e.Success)
	case *holepunch.ProtocolErrorEvt:
		l.ended(evt.Remote, false)
	}
}

func (l *punchLog) started(p peer.ID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if len(l.tries) >= maxPunched {
		for q, t := range l.tries {
			if !t.until.IsZero() && now.After(t.until) {
				delete(l.tries, q)
			}
		}
	}
	if _, ok := l.tries[p]; !ok && len(l.tries) >= maxPunched {
		return // past the bound of punches under way: this one goes unmarked
	}
	l.tries[p] = punchTry{start: now.Add(-punchLead)}
}

// ended closes p's punch window punchGrace from now and marks the direct
// connections that opened since it started: all of them after our own
// attempt succeeded.
func (l *punchLog) ended(p peer.ID, succeeded bool) {
	l.mu.Lock()
	t, ok := l.tries[p]
	if ok {
		t.until = l.now().Add(punchGrace)
		l.tries[p] = t
	}
	l.mu.Unlock()
	switch {
	case succeeded:
		l.markDirect(p, time.Time{})
	case ok:
		l.markDirect(p, t.start)
	}
}

// connected marks a new direct connection to a peer whose punch window
// is open.
func (l *punchLog) connected(c network.Conn) {
	if relayaddr.IsCircuit(c.RemoteMultiaddr()) {
		return
	}
	p := c.RemotePeer()
	l.mu.Lock()
	t, ok := l.tries[p]
	now := l.now()
	open := ok && (t.until.IsZero() || !now.After(t.until))
	if ok && !open {
		delete(l.tries, p)
	}
	l.mu.Unlock()
	if open && !c.Stat().Opened.Before(t.start) {
		l.add(c.ID(), p)
	}
}

// markDirect marks p's direct connections opened at or after since (all
// of them for a zero since).
func (l *punchLog) markDirect(p peer.ID, since time.Time) {
	hp := l.hv.Load()
	if hp == nil {
		return
	}
	for _, c := range (*hp).Network().ConnsToPeer(p) {
		if !relayaddr.IsCircuit(c.RemoteMultiaddr()) && !c.Stat().Opened.Before(since) {
			l.add(c.ID(), p)
		}
	}
}

func (l *punchLog) add(id string, p peer.ID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.conns[id]; ok {
		return
	}
	l.conns[id] = p
	l.order = append(l.order, id)
	for len(l.conns) > maxPunched && len(l.order) > 0 {
		delete(l.conns, l.order[0])
		l.order = l.order[1:]
	}
	if len(l.order) > 2*maxPunched {
		l.compactLocked()
	}
}

// forget drops connection id and reports whether a punch had made it.
func (l *punchLog) forget(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.conns[id]; !ok {
		return false
	}
	delete(l.conns, id)
	if len(l.order) > 2*len(l.conns)+64 {
		l.compactLocked()
	}
	return true
}

// compactLocked drops forgotten IDs from order.
func (l *punchLog) compactLocked() {
	out := l.order[:0]
	for _, id := range l.order {
		if _, ok := l.conns[id]; ok {
			out = append(out, id)
		}
	}
	l.order = out
}

// HolePunched reports whether a hole punch made c.
func (l *punchLog) HolePunched(c network.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.conns[c.ID()]
	return ok
}
