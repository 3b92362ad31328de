package node

import (
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"golang.org/x/time/rate"

	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// punchFilter makes both ends of a hole punch dial one kind of address:
// it picks what each end sends and dials, and punchGate keeps the
// punch's dials to those addresses.
//
// In a punch (DCUtR) each end dials every address the other sent, TCP
// and QUIC, IPv4 and IPv6, at once, and libp2p closes a dial that
// completes after the first one to that peer succeeded (go-libp2p v0.51,
// swarm/limiter.go). When the ends' first successes differ (one end's
// QUIC connection is up first, the other's TCP one), each closes the
// connection the other kept and the pair has none: in the NAT suite both
// punched connections were gone within 2 ms, and the pair stayed on its
// relay until the next punch. So both ends dial only the first kind, of
// QUIC over IPv4, QUIC over IPv6, TCP over IPv4 and TCP over IPv6 (a UDP
// hole is the likelier to open), that both sent; with none in common,
// all. Each end decides from the same two sets (what it sent, what it
// received), so they agree without a word more. Several addresses of
// that one kind (a NAT with more than one public address) are still
// dialed together. A peer without this rule dials all; its other dials
// fail at our NAT (we send nothing to meet them) or land in our
// listener, and an accepted connection is never closed so.
//
// One kind per punch would leave a pair relayed whose NATs open TCP
// holes but not UDP ones (a NAT that maps each UDP destination to a new
// port, and TCP not). libp2p tries a punch up to three times, each with
// a new exchange. So on a punch's next try (an exchange with the peer
// punchSameTry to punchSeries after the one before) an end sends only
// its TCP addresses when the try before picked another kind and both
// have TCP (tcpTurn): a pair tries QUIC, then TCP, then QUIC. Where the
// ends judged differently, the kind is still the first of what both
// sent, so an end that sends TCP alone makes it TCP at both.
//
// That needs FilterRemote, which libp2p hands only the peer, to read
// back what this exchange sent. A pair that punches in both directions
// (each end holds a relayed connection the other dialed) can have two
// exchanges at once: those within punchSameTry of each other are one
// try and send the same, and while an end holds relayed connections
// both ways it takes no new turn, so that both punches pick one kind.
//
// The peer's addresses are what this host dials at once, so FilterRemote
// keeps only public ones, at most maxPunchAddrs: libp2p's hole-punch
// service sends its public addresses alone, and a stranger this host
// dialed through a relay could otherwise aim its dials at the
// volunteer's LAN, hundreds to a message, a message to a stream. And it
// keeps none, so that the punch is refused, past a budget of punches: per
// peer (punchesPerPeer at once, one more each punchPeerEvery) and for all
// peers together (punchesAll, one more each punchAllEvery). Otherwise a
// stranger, a message to a stream, a stream to a round trip, would make
// this host dial maxPunchAddrs public addresses of its choosing each
// round trip: a reflector aimed at a third party.
type punchFilter struct {
	now func() time.Time
	// all is the kinds of the direct addresses we sent in full (none
	// before the first punch: then all are dialed): what we sent to a
	// peer we have no note of (the notes were full).
	all atomic.Uint32

	mu     sync.Mutex
	tries  map[peer.ID]punchNote // bounded by maxPunchNotes
	budget *rate.Limiter         // the punches of all peers
	// gates: what each punch of the last punchDialWindow dials
	// (allowsDial), for every peer punched, noted or not; bounded by
	// maxPunchNotes, which the budget of all peers keeps far off.
	gates map[peer.ID]punchGateNote

	// conns lists the host's connections to a peer (nil until the host
	// is up: then no turns).
	conns atomic.Pointer[func(peer.ID) []network.Conn]
	// listens lists the host's listen addresses (nil until the host is
	// up: then no guessed TCP address).
	listens atomic.Pointer[func() []ma.Multiaddr]
}

// setNetwork gives the filter the host's connections, to tell a pair
// that punches in both directions, and its listeners, for the TCP
// address it guesses (withTCPGuess).
func (f *punchFilter) setNetwork(n network.Network) {
	conns := n.ConnsToPeer
	f.conns.Store(&conns)
	listens := n.ListenAddresses
	f.listens.Store(&listens)
}

// bothWays reports whether we hold relayed connections to p in both
// directions, or cannot tell: libp2p punches on each inbound one.
func (f *punchFilter) bothWays(p peer.ID) bool {
	conns := f.conns.Load()
	if conns == nil {
		return true
	}
	var in, out bool
	for _, c := range (*conns)(p) {
		if relayaddr.IsRelayed(c) {
			if c.Stat().Direction == network.DirInbound {
				in = true
			} else {
				out = true
			}
		}
	}
	return in && out
}

// punchNote is our last punch exchange with a peer.
type punchNote struct {
	last time.Time // when we sent our addresses
	sent addrKinds // the kinds we sent
	peer addrKinds // the kinds it sent
	tcp  bool      // this try is TCP's turn (tcpTurn)
	// budget is the peer's punches (nil until its first): kept across
	// series, dropped with the note once full again (punchForget).
	budget *rate.Limiter
}

const (
	// punchSeries: an exchange within this of the last one with the
	// peer is the next try of the same punch (libp2p's tries follow
	// each other about 5 s apart, punchSameTry); after it, a new punch
	// starts again with QUIC.
	punchSeries = 30 * time.Second
	// punchSameTry: exchanges this close are one try and send the
	// same: the other direction's exchange while one is under way (an
	// end that comes to hold relayed connections both ways, whose old
	// turn must not change what the exchange under way reads back). A
	// try lasts longer: its failed dial ends at go-libp2p's 5 s (the
	// QUIC hole punch's and the TCP connect timeout), and the next try
	// follows a relay's round trip and a half later. A dial that fails
	// at once makes the next exchange the same try: no turn, no harm.
	punchSameTry = 4 * time.Second
	// maxPunchNotes bounds the peers noted; past it, notes older than
	// punchSeries go, and a peer still without room is sent all.
	maxPunchNotes = 1024

	// Punch budgets. An honest pair spends at most 3 tries a direction
	// (libp2p's), both directions at once, and a circuit of node/repunch
	// after a death 5 s later: up to 9 exchanges in half a minute, then
	// a few a minute at most. Each punch the budget refuses leaves the
	// pair on its relay until node/repunch's next try.
	punchesPerPeer = 8
	punchPeerEvery = 10 * time.Second
	// For all peers: a node that many volunteers behind NAT reach at once
	// punches 128 of them at once and the rest at 4 a second; strangers
	// with many identities buy 32 dials a second in all.
	punchesAll    = 128
	punchAllEvery = 250 * time.Millisecond
	// punchForget: a note this old goes when the notes are full; by then
	// its peer's budget is full again, so forgetting it loses nothing.
	punchForget = punchesPerPeer * punchPeerEvery
)

func newPunchFilter() *punchFilter {
	return &punchFilter{now: time.Now, tries: make(map[peer.ID]punchNote), gates: make(map[peer.ID]punchGateNote),
		budget: rate.NewLimiter(rate.Every(punchAllEvery), punchesAll)}
}

// FilterLocal picks the addresses we send to p: all of them, or on a
// try after one that picked QUIC our TCP ones alone (tcpTurn).
func (f *punchFilter) FilterLocal(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	addrs = f.withTCPGuess(addrs)
	all := kindsOf(addrs)
	f.all.Store(uint32(all))
	now := f.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tries[p]
	switch {
	case !ok || now.Sub(t.last) > punchSeries:
		t = punchNote{budget: t.budget}
	case now.Sub(t.last) >= punchSameTry:
		t.tcp = tcpTurn(all, t.peer) && !f.bothWays(p)
	}
	// else the same try, punched in the other direction at once: the
	// same turn, whatever its other exchange has read since.
	t.last = now
	out := addrs
	if t.tcp {
		out = ofKinds(addrs, kindTCP4|kindTCP6)
	}
	t.sent = kindsOf(out)
	if !ok && len(f.tries) >= maxPunchNotes {
		for q, old := range f.tries {
			// A spend can come up to a stream's time after last (the
			// peer's CONNECT read after FilterLocal): a budget not full
			// again is kept.
			if now.Sub(old.last) > punchForget && (old.budget == nil || old.budget.TokensAt(now) >= punchesPerPeer) {
				delete(f.tries, q)
			}
		}
		if len(f.tries) >= maxPunchNotes {
			return addrs // no note: sent in full, as all says
		}
	}
	f.tries[p] = t
	return out
}

// FilterRemote keeps the peer's addresses of the first kind both ends
// sent, none past the punch budgets. libp2p calls it after FilterLocal on
// the same stream, at either end, and refuses the punch when it keeps
// none.
func (f *punchFilter) FilterRemote(p peer.ID, addrs []ma.Multiaddr) []ma.Multiaddr {
	addrs = punchable(addrs)
	if len(addrs) == 0 {
		return nil // refused, and nothing to dial: no budget spent
	}
	sent := addrKinds(f.all.Load())
	now := f.now()
	f.mu.Lock()
	t, ok := f.tries[p]
	if ok && t.budget == nil {
		t.budget = rate.NewLimiter(rate.Every(punchPeerEvery), punchesPerPeer)
	}
	// A peer without a note (the notes are full) has the budget of all
	// alone. A punch refused by the budget of all spends none of the
	// peer's own.
	peerOK := !ok || t.budget.TokensAt(now) >= 1
	allOK := peerOK && f.budget.AllowN(now, 1)
	if ok && allOK {
		sent = t.sent
	}
	var out []ma.Multiaddr
	if allOK {
		out = addrs
		if common := sent & kindsOf(addrs); common != 0 {
			out = ofKinds(addrs, common&-common) // the first kind, in addrKind's order
		}
	}
	if ok {
		if allOK {
			t.budget.AllowN(now, 1)
			t.peer = kindsOf(addrs)
		}
		f.tries[p] = t
	}
	gated := allOK && f.gate(p, out, now)
	f.mu.Unlock()
	switch {
	case !allOK:
		log.Debugw("hole punch refused: past the punch budget", "peer", p, "peer's own", !peerOK)
		return nil
	case !gated:
		log.Debugw("hole punch refused: too many punches under way to keep their dials to their addresses", "peer", p)
		return nil
	}
	return out
}

// punchGateNote is what a peer's punch dials (dialKey), until until: the
// addresses of its last exchange, at at, and those of the one before it
// if that was the same try (both ways at once, under punchSameTry
// apart): at most 2 × maxPunchAddrs.
type punchGateNote struct {
	cur, prev []string
	at, until time.Time
}

// gate notes that p's punch dials out, and reports whether it could;
// f.mu is held.
func (f *punchFilter) gate(p peer.ID, out []ma.Multiaddr, now time.Time) bool {
	g, had := f.gates[p]
	if !had && len(f.gates) >= maxPunchNotes {
		for q, old := range f.gates {
			if now.After(old.until) {
				delete(f.gates, q)
			}
		}
		if len(f.gates) >= maxPunchNotes {
			return false
		}
	}
	g.prev = nil
	if had && now.Before(g.at.Add(punchSameTry)) {
		g.prev = g.cur
	}
	g.cur = make([]string, 0, len(out))
	for _, a := range out {
		g.cur = append(g.cur, dialKey(a))
	}
	g.at, g.until = now, now.Add(punchDialWindow)
	f.gates[p] = g
	return true
}

// punchDialWindow is how long after an exchange the peer's dials are
// kept to the addresses it kept. The punch's own Connect reaches the gate
// half a round trip to a round trip after the exchange (the gate is
// asked once per dial request); the rest of the window keeps other
// Connects to the peer meanwhile (a query's, node/repunch's), which
// join the punch's dial, from adding others.
const punchDialWindow = 10 * time.Second

// allowsDial reports whether a dial to p's address a may go ahead: not,
// within punchDialWindow of an exchange with p, for a direct address the
// exchange did not keep, by any dial of this host's. libp2p's Connect in
// a punch dials every address of the peer the peerstore holds, not only
// the punch's (swarm.addrsForDial, all at once for a punch): the
// addresses identify gave and an earlier try's. Those could be of
// another kind, and two kinds dialed at once can lose the pair both
// connections (above), and a TCP dial in a QUIC try leaves the NAT
// routers an entry that spoils a TCP try for 2 min (node/repunch). And
// a stranger's identify may list as many public addresses as it likes,
// which would make each punch it asks for dial them all, past
// maxPunchAddrs: a reflector.
func (f *punchFilter) allowsDial(p peer.ID, a ma.Multiaddr) bool {
	if kindOf(a) == 0 {
		return true // a relay's, or a kind the filter does not pick
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.gates[p]
	if !ok || f.now().After(g.until) {
		return true
	}
	k := dialKey(a)
	return slices.Contains(g.cur, k) || slices.Contains(g.prev, k)
}

// dialKey is a direct address as the gate compares it: its kind, IP and
// port (whatever follows, a /p2p/ part, aside).
func dialKey(a ma.Multiaddr) string {
	if len(a) < 2 {
		return a.String()
	}
	return a[:2].String() + "/" + strconv.Itoa(int(kindOf(a)))
}

// punchGate is the host's connection gater: a closed swarm's (next, nil
// for none), with the punch filter's rule on a punch's dials
// (allowsDial).
type punchGate struct {
	next connmgr.ConnectionGater
	f    *punchFilter
}

func (g punchGate) InterceptPeerDial(p peer.ID) bool {
	return g.next == nil || g.next.InterceptPeerDial(p)
}

func (g punchGate) InterceptAddrDial(p peer.ID, a ma.Multiaddr) bool {
	return g.f.allowsDial(p, a) && (g.next == nil || g.next.InterceptAddrDial(p, a))
}

func (g punchGate) InterceptAccept(c network.ConnMultiaddrs) bool {
	return g.next == nil || g.next.InterceptAccept(c)
}

func (g punchGate) InterceptSecured(d network.Direction, p peer.ID, c network.ConnMultiaddrs) bool {
	return g.next == nil || g.next.InterceptSecured(d, p, c)
}

func (g punchGate) InterceptUpgraded(c network.Conn) (bool, control.DisconnectReason) {
	if g.next == nil {
		return true, 0
	}
	return g.next.InterceptUpgraded(c)
}

// withTCPGuess adds to addrs, the addresses a punch sends, a guess of our
// public TCP address when libp2p knows none: the public IPv4 address of
// our QUIC one with our TCP listener's port.
//
// libp2p knows a public address only as other peers observe it on a
// live connection of that transport, and between mtor nodes every
// connection is QUIC (the dial ranker's first choice), unless a join
// address named TCP alone. A node behind NAT then sends QUIC addresses
// alone, and a peer whose network lets no UDP out (TCP alone) can never
// punch with it: each end dials the other's, and the node's NAT drops
// the peer's SYNs, which never came. A NAT that keeps a connection's
// source port (Linux's masquerade, most home routers) maps our TCP
// listener's port (libp2p dials from it) to the same port: the guess is
// right. A pair that has QUIC in common still dials QUIC at a punch's
// first try; its TCP turn at the next (FilterLocal) now dials the guess.
// Where the guess is wrong, the peer's dial fails, as it would have
// without it.
func (f *punchFilter) withTCPGuess(addrs []ma.Multiaddr) []ma.Multiaddr {
	listens := f.listens.Load()
	if listens == nil {
		return addrs
	}
	for _, a := range addrs {
		if kindOf(a) == kindTCP4 && manet.IsPublicAddr(a) {
			return addrs // known
		}
	}
	port := ""
	for _, l := range (*listens)() {
		if kindOf(l) != kindTCP4 || len(l) != 2 || manet.IsIPLoopback(l) {
			continue // not plain TCP over IPv4 (a WebSocket's, say), or not reached from outside
		}
		if v, err := l.ValueForProtocol(ma.P_TCP); err == nil && v != "0" {
			port = v
			break
		}
	}
	if port == "" {
		return addrs
	}
	// Each guess right after its QUIC address: the peer keeps only the
	// first maxPunchAddrs public addresses it is sent.
	out := make([]ma.Multiaddr, 0, len(addrs)+1)
	var guessed []string
	for _, a := range addrs {
		out = append(out, a)
		if !manet.IsPublicAddr(a) || kindOf(a) != kindQUIC4 {
			continue
		}
		ip, err := a.ValueForProtocol(ma.P_IP4)
		if err != nil || slices.Contains(guessed, ip) {
			continue
		}
		guessed = append(guessed, ip)
		if g, err := ma.NewMultiaddr("/ip4/" + ip + "/tcp/" + port); err == nil {
			out = append(out, g)
		}
	}
	if len(guessed) == 0 {
		return addrs // no public QUIC address over IPv4 to guess from
	}
	return out
}

// maxPunchAddrs bounds the peer's addresses a punch dials: an honest
// peer sends a few (its public addresses, of up to four kinds, as its
// NAT maps them).
const maxPunchAddrs = 8

// punchable is the public IP addresses of addrs of the kinds the filter
// picks among (kindOf), the first maxPunchAddrs of them.
func punchable(addrs []ma.Multiaddr) []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, min(len(addrs), maxPunchAddrs))
	for _, a := range addrs {
		if len(out) == maxPunchAddrs {
			break
		}
		// An IP literal: a DNS name would be resolved after the
		// filter, to as many addresses as it lists.
		if manet.IsPublicAddr(a) && kindOf(a) != 0 {
			out = append(out, a)
		}
	}
	return out
}

// ofKinds is the addresses of addrs of the kinds in k.
func ofKinds(addrs []ma.Multiaddr, k addrKinds) []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, len(addrs))
	for _, a := range addrs {
		if kindOf(a)&k != 0 {
			out = append(out, a)
		}
	}
	return out
}

// tcpTurn reports whether a try sends TCP alone: both ends have TCP,
// and the first kind both had the try before (ours, and peer, what the
// peer sent then) was another.
func tcpTurn(ours, peer addrKinds) bool {
	const tcp = kindTCP4 | kindTCP6
	common := ours & peer
	return common&tcp != 0 && common&-common&tcp == 0
}

// addrKinds is a set of address kinds, each a bit in order of preference.
type addrKinds uint8

const (
	kindQUIC4 addrKinds = 1 << iota
	kindQUIC6
	kindTCP4
	kindTCP6
)

func kindsOf(addrs []ma.Multiaddr) addrKinds {
	var k addrKinds
	for _, a := range addrs {
		k |= kindOf(a)
	}
	return k
}

// kindOf is a direct address's kind, 0 for another (a relay's: the
// answering end's libp2p hands its filter its relayed addresses too,
// which the other end drops before its own; WebTransport, which mtor does
// not listen on).
func kindOf(a ma.Multiaddr) addrKinds {
	if relayaddr.IsCircuit(a) {
		return 0
	}
	has := func(code int) bool { _, err := a.ValueForProtocol(code); return err == nil }
	var four bool
	switch {
	case has(ma.P_IP4):
		four = true
	case has(ma.P_IP6):
	default:
		return 0 // a DNS name: resolved later, its family unknown here
	}
	switch {
	case has(ma.P_QUIC_V1) && !has(ma.P_WEBTRANSPORT):
		if four {
			return kindQUIC4
		}
		return kindQUIC6
	case has(ma.P_TCP):
		if four {
			return kindTCP4
		}
		return kindTCP6
	}
	return 0
}
