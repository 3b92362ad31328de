package node

import (
	"sync"
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	ma "github.com/multiformats/go-multiaddr"
)

// maxPunched bounds the hole-punched connections remembered: each entry
// leaves when its connection closes; past the bound the oldest go.
const maxPunched = 4096

// punchLog remembers which direct connections a hole punch (DCUtR) made,
// so that the peer views can say "direct after hole punch" rather than
// only "direct". It is libp2p's hole-punch tracer and a network notifiee.
type punchLog struct {
	hv atomic.Pointer[host.Host]

	mu    sync.Mutex
	conns map[string]peer.ID // connection ID -> peer
	order []string           // insertion order, for the bound
}

func newPunchLog() *punchLog { return &punchLog{conns: map[string]peer.ID{}} }

// attach starts following h's connections; call once h exists.
func (l *punchLog) attach(h host.Host) {
	l.hv.Store(&h)
	h.Network().Notify(&network.NotifyBundle{DisconnectedF: func(_ network.Network, c network.Conn) { l.forget(c.ID()) }})
}

// Trace is called by libp2p's hole-punch service on both sides of a punch.
func (l *punchLog) Trace(evt *holepunch.Event) {
	end, ok := evt.Evt.(*holepunch.EndHolePunchEvt)
	if !ok {
		return
	}
	if !end.Success {
		log.Debugw("hole punch failed", "peer", evt.Remote, "after", end.EllapsedTime, "err", end.Error)
		return
	}
	hp := l.hv.Load()
	if hp == nil {
		return
	}
	log.Infow("hole punch: direct connection", "peer", evt.Remote, "after", end.EllapsedTime)
	for _, c := range (*hp).Network().ConnsToPeer(evt.Remote) {
		if _, err := c.RemoteMultiaddr().ValueForProtocol(ma.P_CIRCUIT); err != nil {
			l.add(c.ID(), evt.Remote)
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

func (l *punchLog) forget(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.conns[id]; !ok {
		return
	}
	delete(l.conns, id)
	if len(l.order) > 2*len(l.conns)+64 {
		l.compactLocked()
	}
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
