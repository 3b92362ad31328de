// Package repunch makes a new hole punch after a punched connection died,
// or after a punch that failed from the start.
//
// libp2p punches a hole (DCUtR) when a relayed connection comes in: the
// peer that receives the circuit asks the other to dial at once. When the
// direct connection dies later (a NAT's mapping expired, a home router
// restarted) while the relayed one lives on — mtor's relays set no limit
// that would end it — nothing comes in again, and the pair's traffic stays
// on the relay for good: a volunteer's relay carries every token of it.
// go-libp2p does not let its caller start a punch (the hole-punch
// service's DirectConnect is "only exposed for testing"), so the end that
// dialed the relayed connection replaces it: once no stream that would
// break runs on it, it closes the peer's relayed connections and dials the
// peer again (the relays it was reached by among its other addresses), and
// the new circuit makes the peer's libp2p punch anew. Meanwhile the peer
// keeps its place in the peer table (Reconnecting).
//
// A peer once reached directly is retried 30 s after its last direct
// connection closed, then less and less often (3 min at the least after
// a failed try: DefaultFresh), doubling to 30 min. The waits start over
// only when a direct connection that had lasted (DefaultStable) is lost:
// a punch whose path dies within minutes is no success. A direct
// connection that dies within seconds of opening (DefaultYoung) died in
// its punch, not by its path: the pair is tried again soon
// (DefaultQuick), twice at most before the waits go on.
//
// A peer never reached directly is retried too, once a sweep has seen it
// reached only through relays for DefaultUnpunched and its circuit is
// DefaultFresh old, then doubling to 30 min: libp2p punches on a circuit
// (a direct dial, then three tries) within about 20 s of its opening, at
// worst 45 s, and never again on it, and a burst of loss or a NAT busy
// for that moment would otherwise leave the pair relayed for as long as
// its circuit lives. Only a pair that can punch at all is tried: both
// ends serve the hole-punch protocol (libp2p's service serves it once it
// has found a public address). A pair that still cannot punch (a
// symmetric NAT) pays a moment without a connection at each try, at most
// one every 30 min once the waits have grown.
//
// libp2p's hole-punch service starts only once its host has found a
// public address, a moment after the host starts: a circuit that opens
// before, at either end, is never punched (no punch is made on it, nor
// will be; go-libp2p v0.51, holepunch.Service). A volunteer's node that
// restarts is dialed through its relays at once by the peers that were
// routing to it, so this is the common case, not a rare one. When a peer
// begins to serve the protocol (its identify push), or this host does,
// the circuits dialed from here before that are tried at once (within
// DefaultSettle), not after a wait. (A circuit opened a moment before this
// host began may yet be in the peer's punch: its punch stream holds the
// try off, and a punch that is past its exchange goes on without the
// circuit.)
//
// A peer due for a try that has no circuit dialed from here waits for
// one, and a circuit that comes then gets the wait anew: libp2p punches
// on every new circuit, and closing one in its punch would spoil that
// punch. Nor is a circuit replaced before it is DefaultFresh old (3 min),
// unless a direct connection opened since it did (its punch is over):
// its punch, if it failed, is remembered by the NAT routers for 2 min
// and spoils a new one meanwhile (DefaultFresh). That holds for the
// circuit each try dials too, so tries that fail come 3 min apart at
// the least. Nor does a try come within DefaultRemembered of a punch with
// the peer that failed having dialed TCP, at either end (libp2p's
// hole-punch tracer tells both, Trace): the circuit's age does not tell that when the failed
// punch's circuit is gone, as when the peer restarted since and the
// circuit dialed before it served is tried at once. (The restarted end
// remembers nothing of its predecessor's punches: its own try may come
// within that time, and fail.) A pair with circuits both ways is the
// lower peer ID's to try, so that two punches do not cross; the higher tries a wait later
// if the lower has not (an older mtor).
package repunch

import (
	"context"
	"slices"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

var log = logging.Logger("mtor/repunch")

// Defaults.
const (
	// DefaultInterval is how often the connections are looked at.
	DefaultInterval = 10 * time.Second
	// DefaultFirst is the wait from a direct connection's loss to the
	// first new punch: a relayed connection alone may be the fallback of
	// a moment (a direct one being replaced), and a NAT that dropped a
	// mapping under load may need a while.
	DefaultFirst = 30 * time.Second
	// DefaultMax caps the wait between tries for a pair that no longer
	// punches (one NAT became symmetric): each try costs the pair a
	// moment without a connection.
	DefaultMax = 30 * time.Minute
	// DefaultDialTimeout bounds the dial through the relay.
	DefaultDialTimeout = 15 * time.Second
	// maxPeers bounds the peers remembered.
	maxPeers = 4096
	// maxPerSweep bounds the peers redialed in one sweep.
	maxPerSweep = 8
	// DefaultYoung is the most a direct connection may have lived for
	// its loss to be its punch's failure: both ends of a punch keeping
	// different connections (each closes the one the other kept) or a
	// NAT refusing the pair a moment after letting it through.
	DefaultYoung = 5 * time.Second
	// DefaultQuick is the wait before a new punch after such a loss:
	// the race that lost it goes the other way as often as not.
	DefaultQuick = 5 * time.Second
	// maxQuick bounds the quick tries in a row; then the waits go on.
	maxQuick = 2
	// DefaultUnpunched is the wait from a sweep's first sight of a peer
	// reached only through relays, never directly, to its first new
	// punch: libp2p's own three tries are over by then (and the circuit
	// must be DefaultFresh old too). (A peer that waited for a circuit
	// waits its current wait from the sight of one.)
	DefaultUnpunched = time.Minute
	// DefaultFresh is the least age of a circuit to be replaced, once
	// libp2p punched on it. libp2p punches on a new circuit after its
	// opening (a direct dial and three tries, each up to 10 s: about 20
	// s when they fail, at worst 45 s), and a circuit a query dialed
	// just before a try was due would otherwise be closed in the middle
	// of that punch. And a TCP punch that failed stays in each NAT
	// router's connection tracking for 2 min after its last SYN (Linux's
	// nf_conntrack_tcp_timeout_syn_sent, and the SYN_SENT2 state's
	// built-in 2 min; OpenWrt and most home routers keep both): a new
	// punch meanwhile fails whenever the far end's SYN reaches a router
	// first. The entry takes that SYN for a simultaneous open, then
	// holds the host's SYN-ACK, which starts a new sequence, out of its
	// window: the router marks it invalid and does not translate it
	// (seen in the NAT suite: sent out from the host's private address,
	// and dropped at the far NAT; a router that drops invalid packets,
	// as OpenWrt's firewall does, drops it at once). Tries a minute after
	// a failed punch, then 2 min apart, failed so about one time in two
	// over TCP. UDP's tracking keeps no sequence: QUIC punches are not
	// spoiled, but wait the same (which transport a punch will take is
	// not known before it).
	DefaultFresh = 3 * time.Minute
	// DefaultSettle is the wait from an end's beginning to serve the
	// hole-punch protocol to the try it makes due: the peer's service
	// announces the protocol a moment before it follows new circuits.
	DefaultSettle = time.Second
	// DefaultRemembered is the least wait from the end of a punch that
	// failed over TCP, at either end, to a try with that peer: the routers keep
	// its last SYN's entry 2 min (DefaultFresh says why that spoils a
	// new punch), and a margin. It holds where the circuit's age does
	// not tell: a try at once for a circuit that was never punched, when
	// the failed punch was on a circuit gone since (the peer restarted).
	DefaultRemembered = 2*time.Minute + 15*time.Second
)

// Repuncher replaces a peer's relayed connections to make a new hole punch
// once the direct connection to it is lost, or when the punch on its
// circuit failed. It is safe for concurrent use.
type Repuncher struct {
	h        host.Host
	safe     func(protocol.ID) bool
	interval time.Duration
	first    time.Duration
	max      time.Duration
	dialTO   time.Duration
	stable   time.Duration
	young    time.Duration
	quick    time.Duration
	// unpunched: the first wait of a peer never reached directly.
	unpunched time.Duration
	// fresh: the least age (real time) of a circuit to be replaced.
	fresh time.Duration
	// settle: the wait from a hole-punch service's start to the try.
	settle time.Duration
	now    func() time.Time

	mu    sync.Mutex
	peers map[peer.ID]*state
	tries int64 // peers whose relayed connections were replaced
	// ready: when (real time) this host began to serve the hole-punch
	// protocol, if it began after Attach; no circuit opened before was
	// punched.
	ready time.Time
	// serving: this host serves the hole-punch protocol (seen at Attach
	// or since), so that the event bus's replay of its start on
	// subscription is not taken for a new one.
	serving bool
	// sub follows the protocols of the peers and this host (Attach);
	// kick wakes Run when a try is due at once.
	sub       event.Subscription
	kick      chan struct{}
	closeOnce sync.Once
	// redialing: peers whose connections are being replaced, until when
	// (real time: it covers the disconnection's events, delivered late).
	redialing map[peer.ID]time.Time
	// remembered: the least wait from a failed punch to a try.
	remembered time.Duration
	// failed: when the last punch with a peer failed, for peers whose
	// failure the routers may still hold (Trace); at most maxPeers.
	failed map[peer.ID]time.Time
	// punching: the punches under way; at most maxPeers.
	punching map[peer.ID]punch
}

// punch is a peer's hole-punch attempts under way at this end: how many,
// and whether one of them dials TCP.
type punch struct {
	n   int
	tcp bool
}

// isTCP reports whether a is a TCP address (a WebSocket's too).
func isTCP(a ma.Multiaddr) bool {
	return slices.ContainsFunc(a, func(c ma.Component) bool { return c.Code() == ma.P_TCP })
}

// reconnectLinger is how long after a redial a peer is still reported as
// being reconnected: libp2p delivers its disconnection events late.
const reconnectLinger = 2 * time.Second

// state is what is known of a peer once reached directly, or reached
// through relays alone since a sweep first saw it.
type state struct {
	direct int           // direct connections open
	seen   time.Time     // when one last opened or closed
	next   time.Time     // earliest next try; zero while direct
	delay  time.Duration // the wait before the next try
	quick  int           // quick tries in a row since a direct connection outlived its punch
	// never: not reached directly yet; its waits start at unpunched.
	never bool
	// quickTry: the try due is a quick one, which leaves delay as it is.
	quickTry bool
	// yielded: a try was due with circuits both ways and the peer's ID
	// the lower, and was left to the peer for a wait; the next is made.
	yielded bool
	// punched: when (real time) a direct connection last opened. A
	// circuit older than that is done with its punch, however young.
	punched time.Time
	// ready: when (real time) the peer was seen to begin serving the
	// hole-punch protocol. A circuit older than that was never punched.
	ready time.Time
}

// DefaultStable is how long a direct connection must have lived for its
// loss to start the waits over: a punch whose path dies within minutes
// (a NAT that forgets its mappings faster than the connection's
// keep-alives) is no success, and its pair is tried less and less often.
const DefaultStable = 5 * time.Minute

// Option configures a Repuncher.
type Option func(*Repuncher)

// WithBackoff sets the wait before the first try after a direct
// connection's loss and the most between later tries.
func WithBackoff(first, most time.Duration) Option {
	return func(r *Repuncher) {
		if first > 0 {
			r.first = first
		}
		if most >= r.first {
			r.max = most
		}
	}
}

// WithUnpunched sets the wait before the first try for a peer never
// reached directly, from the sweep that first finds it reached only
// through relays; the waits after it double to the most WithBackoff
// sets.
func WithUnpunched(wait time.Duration) Option {
	return func(r *Repuncher) {
		if wait > 0 {
			r.unpunched = wait
		}
	}
}

// WithSafe names the protocols whose streams may break with the relayed
// connection: their owners open them again when the peer reconnects and
// lose nothing (identify, ping, the DHT, gossipsub on a full reconnect).
// A connection carrying any other stream (a query, a receipt) is left
// until it does not.
func WithSafe(safe func(protocol.ID) bool) Option {
	return func(r *Repuncher) { r.safe = safe }
}

// New is a Repuncher of h's connections. Call Attach before h connects to
// anyone, then Run.
func New(h host.Host, opts ...Option) *Repuncher {
	r := &Repuncher{
		h: h, safe: func(protocol.ID) bool { return false },
		interval: DefaultInterval, first: DefaultFirst, max: DefaultMax, dialTO: DefaultDialTimeout, stable: DefaultStable,
		young: DefaultYoung, quick: DefaultQuick, unpunched: DefaultUnpunched, fresh: DefaultFresh,
		settle: DefaultSettle, now: time.Now, peers: map[peer.ID]*state{}, redialing: map[peer.ID]time.Time{},
		kick: make(chan struct{}, 1), remembered: DefaultRemembered, failed: map[peer.ID]time.Time{},
		punching: map[peer.ID]punch{},
	}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Reconnecting reports whether p's connections are being replaced, so
// that its disconnection is not taken for its departure (the peer table
// would drop it until it announced again; discovery.WithReconnecting).
func (r *Repuncher) Reconnecting(p peer.ID) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	until, ok := r.redialing[p]
	return ok && time.Now().Before(until)
}

// Trace takes libp2p's hole-punch events (a holepunch.EventTracer, handed
// on by the node): a punch with a peer that failed, at either end, holds
// the tries with that peer off for DefaultRemembered if it dialed TCP (or
// its start went unseen), and so does a failed direct dial (made by the
// end the circuit came in to, before its punch, to every address: its
// SYNs leave the same entries). One that made a direct connection ends
// that, and so does a failure of one end's dial while the other's made
// one, however short it lived: the path is open.
func (r *Repuncher) Trace(evt *holepunch.Event) {
	var ok bool
	var took time.Duration
	p := evt.Remote
	switch e := evt.Evt.(type) {
	case *holepunch.StartHolePunchEvt:
		// What this end dials: the punch's addresses (the punch
		// filter's), and every other address of the peer's it holds
		// (libp2p's Connect dials them all), of which a public TCP one
		// shares the punch's four-tuple. The node's punch gate keeps
		// those to the punch's own where its filter noted the
		// exchange; not always, so to be safe a held public TCP
		// address counts.
		tcp := slices.ContainsFunc(e.RemoteAddrs, func(a string) bool {
			m, err := ma.NewMultiaddr(a)
			return err != nil || isTCP(m) // unreadable: on the safe side
		}) || slices.ContainsFunc(r.h.Peerstore().Addrs(p), func(a ma.Multiaddr) bool { return isTCP(a) && manet.IsPublicAddr(a) })
		r.mu.Lock()
		if pu, ok := r.punching[p]; ok || len(r.punching) < maxPeers {
			// Attempts may overlap (circuits both ways): one TCP dial
			// among them makes the lot TCP's.
			r.punching[p] = punch{n: pu.n + 1, tcp: pu.tcp || tcp}
		}
		r.mu.Unlock()
		return
	case *holepunch.EndHolePunchEvt:
		ok, took = e.Success, e.EllapsedTime
		r.mu.Lock()
		pu, seen := r.punching[p]
		if pu.n--; pu.n > 0 {
			r.punching[p] = pu
		} else {
			delete(r.punching, p)
		}
		r.mu.Unlock()
		if !ok && seen && !pu.tcp {
			// UDP's tracking keeps no sequence: a failed QUIC punch
			// spoils none after it.
			return
		}
	case *holepunch.DirectDialEvt:
		ok, took = e.Success, e.EllapsedTime
	default:
		return
	}
	// A second's margin: the peer's dial starts when our SYNC reaches it,
	// which may be before our own attempt's clock.
	began := time.Now().Add(-took - time.Second)
	r.mu.Lock()
	defer r.mu.Unlock()
	// A direct connection that opened since (direct, told synchronously
	// by the swarm) has set punched.
	if s := r.peers[p]; ok || s != nil && !s.punched.Before(began) {
		delete(r.failed, p)
		return
	}
	if _, ok := r.failed[p]; !ok && len(r.failed) >= maxPeers {
		r.forgetFailed()
	}
	r.failed[p] = r.now()
}

// forgetFailed makes room in r.failed: it drops the oldest failure (the
// ones the routers have forgotten go at each sweep); r.mu is held.
func (r *Repuncher) forgetFailed() {
	var oldest peer.ID
	for p, at := range r.failed {
		if oldest == "" || at.Before(r.failed[oldest]) {
			oldest = p
		}
	}
	delete(r.failed, oldest)
}

// Attach follows h's connections, and the start of the hole-punch
// protocol at either end. Run's end, or Close, stops the latter.
func (r *Repuncher) Attach() {
	r.mu.Lock()
	r.serving = slices.Contains(r.h.Mux().Protocols(), holepunch.Protocol)
	r.mu.Unlock()
	sub, err := r.h.EventBus().Subscribe([]any{new(event.EvtPeerProtocolsUpdated), new(event.EvtLocalProtocolsUpdated)},
		eventbus.BufSize(64), eventbus.Name("mtor/repunch"))
	if err != nil {
		log.Warnw("hole-punch service starts not followed: circuits opened before one wait for the sweeps", "err", err)
	} else {
		r.sub = sub
		go r.follow(sub)
	}
	r.h.Network().Notify(&network.NotifyBundle{
		ConnectedF: func(_ network.Network, c network.Conn) {
			if !relayaddr.IsRelayed(c) {
				r.direct(c.RemotePeer())
			}
		},
		DisconnectedF: func(_ network.Network, c network.Conn) {
			if !relayaddr.IsRelayed(c) {
				r.lost(c.RemotePeer(), time.Since(c.Stat().Opened))
			}
		},
	})
}

// direct notes a direct connection to p: the pair can punch, and nothing
// is due while it lasts.
func (r *Repuncher) direct(p peer.ID) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.peers[p]
	if s == nil {
		if len(r.peers) >= maxPeers {
			r.forgetOne()
		}
		s = &state{delay: r.first}
		r.peers[p] = s
	}
	if s.never {
		// Punched at last: its losses get the waits of a pair that
		// punches.
		s.never, s.delay = false, r.first
	}
	s.direct++
	s.seen, s.next, s.yielded, s.punched = r.now(), time.Time{}, false, time.Now()
	delete(r.failed, p) // the path is open
}

// lost notes that a direct connection to p closed after it had lived for
// lived. When it was the last, a try is due after the wait: the first
// one if the connection had lasted, else a longer one each time, and a
// quick one if it died in its punch.
func (r *Repuncher) lost(p peer.ID, lived time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.peers[p]
	if s == nil {
		return
	}
	s.direct = max(s.direct-1, 0)
	s.seen = r.now()
	if lived >= r.stable {
		s.delay = r.first
	}
	if lived >= r.young {
		s.quick = 0 // a death by the path ends the row of quick tries
	}
	if s.direct > 0 {
		return
	}
	s.next, s.quickTry = s.seen.Add(s.delay), false
	if lived < r.young && s.quick < maxQuick {
		s.quick++
		s.next, s.quickTry = s.seen.Add(r.quick), true
	}
}

// forgetOne makes room: it drops, of the peers not reached directly now,
// the one seen longest ago (a peer connected directly is the one to
// punch again when its connection dies), else the oldest of all; r.mu is
// held.
func (r *Repuncher) forgetOne() {
	var drop peer.ID
	var at time.Time
	idle := false // whether drop is not reached directly
	for p, s := range r.peers {
		switch pIdle := s.direct == 0; {
		case drop == "", pIdle && !idle, pIdle == idle && s.seen.Before(at):
			drop, at, idle = p, s.seen, pIdle
		}
	}
	delete(r.peers, drop)
}

// Run looks at the connections every interval, and a moment after an end
// begins to serve the hole-punch protocol, until ctx ends.
func (r *Repuncher) Run(ctx context.Context) {
	defer r.Close()
	t := time.NewTicker(r.interval)
	defer t.Stop()
	soon := time.NewTimer(time.Hour)
	soon.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.Sweep(ctx)
		case <-soon.C:
			r.Sweep(ctx)
		case <-r.kick:
			soon.Reset(r.settle)
		}
	}
}

// Close stops following the protocols' starts.
func (r *Repuncher) Close() {
	r.closeOnce.Do(func() {
		if r.sub != nil {
			_ = r.sub.Close()
		}
	})
}

// follow takes the protocol events until sub closes. It only marks the
// peers due and wakes Run: a sweep's redials take seconds, and the event
// bus blocks an emitter (identify, a SetStreamHandler) while its
// subscriber's buffer is full.
func (r *Repuncher) follow(sub event.Subscription) {
	for e := range sub.Out() {
		if r.served(e) > 0 {
			select {
			case r.kick <- struct{}{}:
			default:
			}
		}
	}
}

// served takes an identify push or a change of this host's protocols and,
// when the peer or this host began to serve the hole-punch protocol,
// makes a try due for each peer then reached only through circuits
// dialed from here; it returns how many.
func (r *Repuncher) served(e any) int {
	var ps []peer.ID
	local := false
	switch e := e.(type) {
	case event.EvtPeerProtocolsUpdated:
		ps = []peer.ID{e.Peer}
		if !slices.Contains(e.Added, holepunch.Protocol) {
			return 0
		}
	case event.EvtLocalProtocolsUpdated:
		if !slices.Contains(e.Added, holepunch.Protocol) {
			return 0
		}
		r.mu.Lock()
		seen := r.serving
		r.serving = true
		r.mu.Unlock()
		if seen {
			return 0 // the replay, on subscription, of a start before Attach
		}
		ps, local = r.h.Network().Peers(), true
	default:
		return 0
	}
	ready := time.Now()
	if !slices.Contains(r.h.Mux().Protocols(), holepunch.Protocol) {
		return 0 // a peer's circuit reaches no service of ours yet
	}
	ps = slices.DeleteFunc(ps, func(p peer.ID) bool { return !r.circuitsOnly(p) || !r.punches(p) })
	r.mu.Lock()
	defer r.mu.Unlock()
	if local {
		r.ready = ready
	}
	now, began := r.now(), "the peer"
	if local {
		began = "this host"
	}
	for _, p := range ps {
		s := r.peers[p]
		if s == nil {
			if len(r.peers) >= maxPeers {
				r.forgetOne()
			}
			s = &state{delay: r.unpunched, seen: now, never: true}
			r.peers[p] = s
		}
		if !local {
			s.ready = ready
		}
		// Its circuits were not punched: a try at once, which leaves
		// the waits as they are. (A direct connection opened since
		// the look makes the sweep pass it by.)
		s.next, s.quickTry, s.yielded = now, true, false
		log.Debugw("circuits opened before both ends served hole punching: a try at once", "peer", p, "began", began)
	}
	return len(ps)
}

// circuitsOnly reports whether every connection to p is relayed and one
// of them was dialed from here: a peer this end may redial.
func (r *Repuncher) circuitsOnly(p peer.ID) bool {
	outbound := false
	for _, c := range r.h.Network().ConnsToPeer(p) {
		if !relayaddr.IsRelayed(c) {
			return false
		}
		outbound = outbound || c.Stat().Direction == network.DirOutbound
	}
	return outbound
}

// noteCircuits looks at the circuits dialed from here (in conns) to peers
// with no direct connection. A peer that waited for one (due, with none)
// gets its wait anew. A peer unknown so far was never reached directly:
// libp2p's punch failed, or none was made; if the pair can punch, its
// first try is due r.unpunched from now. r.mu is held.
func (r *Repuncher) noteCircuits(conns []network.Conn, now time.Time) {
	serves := slices.Contains(r.h.Mux().Protocols(), holepunch.Protocol)
	direct := map[peer.ID]bool{}
	for _, c := range conns {
		if !relayaddr.IsRelayed(c) {
			direct[c.RemotePeer()] = true
		}
	}
	for _, c := range conns {
		p := c.RemotePeer()
		if !relayaddr.IsRelayed(c) || c.Stat().Direction != network.DirOutbound || direct[p] {
			continue
		}
		if s := r.peers[p]; s != nil {
			if s.direct == 0 && s.next.IsZero() {
				s.next = now.Add(s.delay)
			}
			continue
		}
		if !serves || !r.punches(p) {
			continue
		}
		if len(r.peers) >= maxPeers {
			r.forgetOne()
		}
		r.peers[p] = &state{delay: r.unpunched, seen: now, next: now.Add(r.unpunched), never: true}
	}
}

// punches reports whether p serves the hole-punch protocol: its libp2p
// punches on the circuit (and reaches this host's hole-punch service for
// it, which the caller checks).
func (r *Repuncher) punches(p peer.ID) bool {
	ok, err := r.h.Peerstore().SupportsProtocols(p, holepunch.Protocol)
	return err == nil && len(ok) > 0
}

// candidate is a peer due for a try, with the relayed connections to
// replace.
type candidate struct {
	p     peer.ID
	conns []network.Conn
	// punched: when a direct connection to p last opened.
	punched time.Time
	// ready: when p or this host began to serve the hole-punch protocol.
	ready time.Time
	// failed: when the last punch with p failed, if the routers may
	// still hold it.
	failed time.Time
}

// Sweep replaces the relayed connections of the peers due for a new punch
// and returns how many peers it redialed.
func (r *Repuncher) Sweep(ctx context.Context) int {
	now := r.now()
	var due []candidate
	conns := r.h.Network().Conns()
	r.mu.Lock()
	for p, until := range r.redialing {
		if time.Since(until) > 0 {
			delete(r.redialing, p)
		}
	}
	for p, at := range r.failed {
		if now.Sub(at) >= r.remembered {
			delete(r.failed, p)
		}
	}
	r.noteCircuits(conns, now)
	for p, s := range r.peers {
		if !s.next.IsZero() && !now.Before(s.next) {
			ready := s.ready
			if r.ready.After(ready) {
				ready = r.ready
			}
			due = append(due, candidate{p: p, punched: s.punched, ready: ready, failed: r.failed[p]})
		}
	}
	r.mu.Unlock()
	n := 0
	for _, c := range due {
		if n >= maxPerSweep || ctx.Err() != nil {
			break
		}
		if !c.failed.IsZero() {
			// The routers may still hold that punch, and would spoil
			// this one: the try stays due for a later sweep.
			log.Debugw("a try waits: a punch with the peer failed lately", "peer", c.p, "failed", c.failed, "until", c.failed.Add(r.remembered))
			continue
		}
		conns, v := r.replaceable(c.p, c.punched, c.ready)
		switch v {
		case hasDirect, noCircuit:
			// A direct connection the count missed: nothing to do
			// until it goes too (its loss makes the next try due).
			// No circuit: the wait starts anew when one comes
			// (noteCircuits), after libp2p's punch on it.
			r.mu.Lock()
			if s := r.peers[c.p]; s != nil {
				s.next, s.quickTry, s.yielded = time.Time{}, false, false
			}
			r.mu.Unlock()
			continue
		case notNow:
			continue
		case peersTurn:
			// The peer's to try; if it has not a wait later (it
			// would have closed these circuits), this end does.
			r.mu.Lock()
			s := r.peers[c.p]
			if s == nil || s.direct > 0 || s.next.IsZero() {
				r.mu.Unlock()
				continue // forgotten, or direct since the look
			}
			wait := !s.yielded
			if wait {
				s.yielded, s.next = true, now.Add(r.yieldFor(s))
			}
			r.mu.Unlock()
			if wait {
				continue
			}
		}
		c.conns = conns
		if r.redial(ctx, c) {
			n++
		}
	}
	return n
}

// yieldFor is how long the end with the higher peer ID leaves a try due
// to its peer: a wait, or for a quick try two of the peer's sweeps.
func (r *Repuncher) yieldFor(s *state) time.Duration {
	if s.quickTry {
		return max(r.quick, 2*r.interval)
	}
	return s.delay
}

// verdict is what a sweep may do with a peer due for a try.
type verdict int

const (
	replace   verdict = iota // replace its connections now
	hasDirect                // a direct connection is back, or being made
	noCircuit                // no circuit dialed from here: the peer's libp2p punches on an incoming one, so one that came in from p is p's to replace
	notNow                   // a stream that would break, or a circuit in its punch
	peersTurn                // circuits both ways, and the peer's ID is the lower
)

// replaceable returns p's relayed connections and whether a new punch
// should replace them now: every connection to p is relayed, at least one
// was dialed from here, none carries a stream that would break or is in
// its punch still (young, and opened since the last direct connection to
// p, at punched, and since both ends served the hole-punch protocol, at
// ready), and, with circuits both ways, this host's peer ID is the lower
// (else the peer's turn comes first).
func (r *Repuncher) replaceable(p peer.ID, punched, ready time.Time) ([]network.Conn, verdict) {
	conns := r.h.Network().ConnsToPeer(p)
	outbound, inbound, idle, fresh := false, false, true, false
	for _, c := range conns {
		if !relayaddr.IsRelayed(c) {
			return nil, hasDirect
		}
		if c.Stat().Direction == network.DirOutbound {
			outbound = true
		} else {
			inbound = true
		}
		idle = idle && r.idle(c)
		opened := c.Stat().Opened
		fresh = fresh || time.Since(opened) < r.fresh && opened.After(punched) && opened.After(ready)
	}
	switch {
	case !outbound:
		return nil, noCircuit
	case !idle, fresh:
		return nil, notNow
	case inbound && r.h.ID() > p:
		return conns, peersTurn
	}
	return conns, replace
}

// idle reports whether every stream on c may break with it.
func (r *Repuncher) idle(c network.Conn) bool {
	for _, s := range c.GetStreams() {
		if !r.safe(s.Protocol()) {
			return false
		}
	}
	return true
}

// redial closes c's connections and dials its peer again, through the
// relays it was reached by among its other addresses, and reports whether
// it closed them. A failed dial leaves the peer to whatever dials it next
// (a query, discovery); the try is counted all the same.
func (r *Repuncher) redial(ctx context.Context, c candidate) bool {
	addrs := make([]ma.Multiaddr, 0, len(c.conns))
	for _, conn := range c.conns {
		// An incoming circuit came through a relay of ours, not of the
		// peer's: only the ones dialed from here lead back to it.
		if conn.Stat().Direction == network.DirOutbound {
			addrs = append(addrs, conn.RemoteMultiaddr())
		}
	}
	for _, conn := range c.conns {
		// A stream opened since the look is left alone: the next sweep
		// looks again. One that opens between this look and the close
		// (or is still on its way from the peer) fails over like any
		// stream of a lost connection.
		if !r.idle(conn) {
			return false
		}
	}
	r.mu.Lock()
	if s := r.peers[c.p]; s != nil {
		if !s.quickTry {
			s.delay = min(2*s.delay, r.max)
		}
		s.next, s.quickTry, s.yielded = r.now().Add(s.delay), false, false
	}
	r.tries++
	r.redialing[c.p] = time.Now().Add(r.dialTO + reconnectLinger)
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.redialing[c.p] = time.Now().Add(reconnectLinger)
		r.mu.Unlock()
	}()
	for _, conn := range c.conns {
		_ = conn.Close()
	}
	// Kept longer than Connect's own (TempAddrTTL): identify, on the
	// close above, expires the peer's temporary addresses, and could
	// take these with them before the dial.
	r.h.Peerstore().AddAddrs(c.p, addrs, peerstore.RecentlyConnectedAddrTTL)
	dctx, cancel := context.WithTimeout(ctx, r.dialTO)
	defer cancel()
	if err := r.h.Connect(dctx, peer.AddrInfo{ID: c.p, Addrs: addrs}); err != nil {
		log.Infow("redial for a new hole punch failed", "peer", c.p, "err", err)
		return true
	}
	log.Infow("relayed connection replaced for a new hole punch", "peer", c.p, "via", addrs)
	return true
}
