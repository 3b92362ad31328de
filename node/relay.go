package node

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

var relayLog = logging.Logger("mtor/relay")

// Reachability is whether peers outside this node's network can dial it.
type Reachability int

// Reachability values.
const (
	ReachabilityUnknown Reachability = iota // not known (yet); "auto" as a setting
	ReachabilityPublic                      // dialable from outside
	ReachabilityPrivate                     // behind NAT or a firewall: reached through relays
)

func (r Reachability) String() string {
	switch r {
	case ReachabilityPublic:
		return "public"
	case ReachabilityPrivate:
		return "private"
	}
	return "unknown"
}

// ParseReachability reads a --reachability value: auto, public or private.
func ParseReachability(s string) (Reachability, error) {
	switch s {
	case "", "auto":
		return ReachabilityUnknown, nil
	case "public":
		return ReachabilityPublic, nil
	case "private":
		return ReachabilityPrivate, nil
	}
	return ReachabilityUnknown, fmt.Errorf("reachability %q: want auto, public or private", s)
}

// ReachabilityInfo is what a node knows of its own reachability.
type ReachabilityInfo struct {
	Status Reachability
	// How Status was learnt: "forced" (--reachability or --relay),
	// "autonat" (peers dialled us back, or could not), "no public
	// address" (presumed private until AutoNAT says otherwise), or
	// "announced" (--announce, presumed public).
	How string
	// Relays holds the reservations this node holds now.
	Relays []RelayInfo
}

// RelayInfo is one relay reservation.
type RelayInfo struct {
	Peer    peer.ID
	Addrs   []ma.Multiaddr // this node's relayed addresses through it
	Since   time.Time
	Expires time.Time
}

// Relay keeping: a node behind NAT holds reservations on the swarm's own
// relays (the peers announcing the relay role) as soon as it sees them. A
// node without the swarm view sees them once it asks discovery to watch
// the relay topic (WatchRelays), which it does while it has no candidate.
const (
	// DefaultRelays is how many reservations a private node holds.
	DefaultRelays = 2
	// keeperTick bounds how late the keeper notices anything it is not
	// told of by an event.
	keeperTick = time.Second
	// reserveTimeout bounds one reservation, connecting included.
	reserveTimeout = 10 * time.Second
	// refreshBefore renews a reservation this long before it expires.
	refreshBefore = 2 * time.Minute
	// Back-off after a refused or failed reservation: 1 s doubling to 10 s,
	// each wait spread by up to half again (backoff),
	// forgotten when the relay announces afresh (it restarted).
	relayBackoffBase = time.Second
	relayBackoffMax  = 10 * time.Second
	// circuitAddrsPerRelay bounds the relayed addresses through one relay.
	circuitAddrsPerRelay = 4
	// aclIdentifyWait bounds how long our relay waits for identify to say
	// whether an unknown peer is a member of the swarm.
	aclIdentifyWait = 2 * time.Second
)

// Why not libp2p's autorelay: it starts only once AutoNAT has found the
// node private, which never happens where no peer can dial back a public
// address (AutoNAT servers do not dial private ones); it builds relayed
// addresses only from a relay's public addresses, so a swarm on a VPN, a
// campus network or a carrier-grade NAT range gets none; and it skips a
// relay that refused once for an hour. The keeper below reserves from the
// first candidate, retries a refusal within seconds, and replaces a lost
// relay at once.

// relayKeeper holds this node's relay reservations.
type relayKeeper struct {
	hv        atomic.Value // host.Host, set once the host exists
	disc      atomic.Pointer[discovery.Discovery]
	forced    Reachability
	announced []ma.Multiaddr // --announce: prepended to our addresses
	want      int
	onChange  func() // our addresses changed; set before run
	// probe checks a connection and closes it if its peer is gone
	// (liveness.Checker.Suspect); set before run. A killed relay on QUIC
	// leaves a connection that looks open until its idle timeout.
	probe func(network.Conn)

	autonat atomic.Int32 // network.Reachability from AutoNAT
	kick    chan struct{}

	mu      sync.Mutex
	held    map[peer.ID]*RelayInfo
	backoff map[peer.ID]relayBackoff
	// lost: a relay was lost since discovery was last asked for relays
	// (it may come back, or another be needed soon).
	lost bool
}

// relayBackoff is the wait before a relay whose reservation failed is
// tried again: spread, so that the volunteers of a restarted relay do not
// all ask it again at the same moment.
type relayBackoff struct {
	until time.Time
	wait  backoff
}

func newRelayKeeper(forced Reachability, announced []ma.Multiaddr, want int) *relayKeeper {
	return &relayKeeper{
		forced: forced, announced: announced, want: want,
		kick:    make(chan struct{}, 1),
		held:    map[peer.ID]*RelayInfo{},
		backoff: map[peer.ID]relayBackoff{},
	}
}

func (k *relayKeeper) host() host.Host {
	h, _ := k.hv.Load().(host.Host)
	return h
}

func (k *relayKeeper) poke() {
	select {
	case k.kick <- struct{}{}:
	default:
	}
}

// run keeps reservations until ctx ends.
func (k *relayKeeper) run(ctx context.Context) {
	h := k.host()
	sub, err := h.EventBus().Subscribe([]any{new(event.EvtLocalReachabilityChanged), new(event.EvtPeerConnectednessChanged)},
		eventbus.BufSize(64), eventbus.Name("mtor/relay"))
	if err != nil {
		relayLog.Errorw("relay keeper not started", "err", err.Error())
		return
	}
	defer sub.Close()
	var joins <-chan discovery.Event
	if d := k.disc.Load(); d != nil {
		ch, cancel := d.Table().Subscribe(64)
		defer cancel()
		joins = ch
	}
	t := time.NewTicker(keeperTick)
	defer t.Stop()
	k.step(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			switch ev := e.(type) {
			case event.EvtLocalReachabilityChanged:
				k.autonat.Store(int32(ev.Reachability))
				relayLog.Infow("AutoNAT reachability", "reachability", ev.Reachability.String())
			case event.EvtPeerConnectednessChanged:
				if !k.holds(ev.Peer) || ev.Connectedness == network.Connected {
					continue
				}
			}
		case ev := <-joins:
			if ev.Kind != discovery.Join {
				continue
			}
			k.mu.Lock()
			delete(k.backoff, ev.Peer)
			k.mu.Unlock()
		case <-k.kick:
		case <-t.C:
		}
		k.step(ctx)
	}
}

func (k *relayKeeper) holds(p peer.ID) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.held[p]
	return ok
}

// needed reports whether this node should hold relay reservations, and why
// it believes what it believes of its reachability.
func (k *relayKeeper) status() (Reachability, string) {
	if k.forced != ReachabilityUnknown {
		return k.forced, "forced"
	}
	switch network.Reachability(k.autonat.Load()) {
	case network.ReachabilityPublic:
		return ReachabilityPublic, "autonat"
	case network.ReachabilityPrivate:
		return ReachabilityPrivate, "autonat"
	}
	if len(k.announced) > 0 {
		return ReachabilityPublic, "announced"
	}
	if h := k.host(); h != nil && !hasPublicAddr(h.Addrs()) {
		return ReachabilityPrivate, "no public address"
	}
	return ReachabilityUnknown, "autonat pending"
}

// hasPublicAddr reports whether addrs hold a public, direct address.
func hasPublicAddr(addrs []ma.Multiaddr) bool {
	for _, a := range addrs {
		if !relayaddr.IsCircuit(a) && manet.IsPublicAddr(a) {
			return true
		}
	}
	return false
}

// step brings the reservations to what is needed: drops lost relays,
// renews expiring reservations, and reserves on new candidates.
func (k *relayKeeper) step(ctx context.Context) {
	h := k.host()
	st, _ := k.status()
	var changed atomic.Bool
	defer func() {
		if changed.Load() && k.onChange != nil {
			k.onChange()
		}
	}()
	k.mu.Lock()
	if st != ReachabilityPrivate {
		if len(k.held) > 0 {
			relayLog.Infow("reachable without relays; reservations dropped", "relays", len(k.held))
			for p := range k.held {
				k.unholdLocked(h, p)
			}
			changed.Store(true)
		}
		k.mu.Unlock()
		return
	}
	// A relay forgets a reservation with its connection.
	now := time.Now()
	var renew []peer.ID
	for p, ri := range k.held {
		if h.Network().Connectedness(p) != network.Connected {
			relayLog.Infow("relay lost", "relay", p)
			k.unholdLocked(h, p)
			k.lost = true
			changed.Store(true)
			continue
		}
		if ri.Expires.Sub(now) < refreshBefore {
			renew = append(renew, p)
		}
		if k.probe != nil {
			for _, c := range h.Network().ConnsToPeer(p) {
				k.probe(c)
			}
		}
	}
	missing := k.want - len(k.held)
	need := missing + len(renew)
	k.mu.Unlock()
	if need <= 0 {
		return
	}
	cands := k.candidates(now)
	if len(cands) == 0 && missing > 0 {
		// Without the swarm view no relay announces to us until we
		// ask; with it, this does nothing.
		if d := k.disc.Load(); d != nil {
			k.mu.Lock()
			afresh := k.lost
			k.lost = false
			k.mu.Unlock()
			if err := d.WatchRelays(afresh); err != nil {
				relayLog.Debugw("watch relays", "err", err)
			}
		}
	}
	for _, p := range renew {
		cands = append([]peer.AddrInfo{{ID: p, Addrs: h.Peerstore().Addrs(p)}}, cands...)
	}
	cands = cands[:min(len(cands), need)]
	if len(cands) == 0 {
		return
	}
	var wg sync.WaitGroup
	for _, ai := range cands {
		wg.Go(func() {
			if k.reserve(ctx, ai) {
				changed.Store(true)
			}
		})
	}
	wg.Wait()
}

// relayTag protects the connections to the relays we hold reservations on.
const relayTag = "mtor-relay"

// unholdLocked forgets the reservation on p and lets its connection be
// trimmed again.
func (k *relayKeeper) unholdLocked(h host.Host, p peer.ID) {
	h.ConnManager().Unprotect(p, relayTag)
	delete(k.held, p)
}

// reserve asks ai for a reservation and records the outcome.
func (k *relayKeeper) reserve(ctx context.Context, ai peer.AddrInfo) (ok bool) {
	h := k.host()
	rctx, cancel := context.WithTimeout(ctx, reserveTimeout)
	defer cancel()
	start := time.Now()
	h.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
	// A relay that just restarted must not wait out the dial back-off of
	// our failed dials while it was down.
	discovery.ClearDialBackoff(h, ai.ID)
	if !directlyConnected(h, ai.ID) {
		// A relay refuses a reservation over a relayed connection, and
		// a restarted relay may well have reached us through another
		// relay first: dial it directly.
		_ = h.Connect(network.WithForceDirectDial(rctx, "mtor relay reservation"), ai)
	}
	rsvp, err := client.Reserve(rctx, h, ai)
	var circuit []ma.Multiaddr
	if err == nil {
		circuit = k.circuitAddrs(h, ai.ID) // before locking: it reads h.Addrs, which asks k
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err != nil {
		if ctx.Err() != nil {
			return false
		}
		b, seen := k.backoff[ai.ID]
		if !seen {
			b.wait = backoff{floor: relayBackoffBase, ceil: relayBackoffMax}
		}
		wait := b.wait.next()
		b.until = time.Now().Add(wait)
		k.backoff[ai.ID] = b
		relayLog.Infow("relay reservation failed", "relay", ai.ID, "retry_in", wait, "err", err.Error())
		return false
	}
	delete(k.backoff, ai.ID)
	_, renewed := k.held[ai.ID]
	ri := &RelayInfo{Peer: ai.ID, Since: time.Now(), Expires: rsvp.Expiration, Addrs: circuit}
	if old := k.held[ai.ID]; old != nil {
		ri.Since = old.Since
	}
	k.held[ai.ID] = ri
	// The connection manager's trim would end the reservation with the
	// connection, and nobody could reach us until the next one.
	h.ConnManager().Protect(ai.ID, relayTag)
	if !renewed {
		relayLog.Infow("relay reservation", "relay", ai.ID, "took", time.Since(start), "addrs", ri.Addrs)
	}
	return !renewed
}

// candidates are the swarm's relays we hold no reservation on and that
// are not backing off: those we are connected to first.
func (k *relayKeeper) candidates(now time.Time) []peer.AddrInfo {
	d := k.disc.Load()
	if d == nil {
		return nil
	}
	h := k.host()
	k.mu.Lock()
	defer k.mu.Unlock()
	for p, b := range k.backoff {
		if now.After(b.until.Add(relayBackoffMax)) {
			delete(k.backoff, p) // forgotten: a later failure starts at the base
		}
	}
	var out []peer.AddrInfo
	for _, e := range d.Table().Snapshot() {
		if e.Self || !slices.Contains(e.Announce.GetRoles(), "relay") {
			continue
		}
		if _, ok := k.held[e.Peer]; ok {
			continue
		}
		if b, ok := k.backoff[e.Peer]; ok && now.Before(b.until) {
			continue
		}
		addrs := h.Peerstore().Addrs(e.Peer)
		for _, b := range e.Announce.GetAddrs() {
			if m, err := ma.NewMultiaddrBytes(b); err == nil && !relayaddr.IsCircuit(m) {
				addrs = append(addrs, m)
			}
		}
		if len(addrs) == 0 && h.Network().Connectedness(e.Peer) != network.Connected {
			continue
		}
		out = append(out, peer.AddrInfo{ID: e.Peer, Addrs: ma.Unique(addrs)})
	}
	slices.SortStableFunc(out, func(a, b peer.AddrInfo) int {
		ca := h.Network().Connectedness(a.ID) == network.Connected
		cb := h.Network().Connectedness(b.ID) == network.Connected
		switch {
		case ca && !cb:
			return -1
		case cb && !ca:
			return 1
		}
		return 0
	})
	return out
}

// circuitAddrs are our addresses through relay r: the relay's addresses
// we reached it on first (which others reach it on too), then the others
// we know, loopback ones only on a loopback-only node.
func (k *relayKeeper) circuitAddrs(h host.Host, r peer.ID) []ma.Multiaddr {
	var base []ma.Multiaddr
	for _, c := range h.Network().ConnsToPeer(r) {
		a := c.RemoteMultiaddr()
		if c.Stat().Direction == network.DirOutbound && !relayaddr.IsCircuit(a) {
			base = append(base, a)
		}
	}
	for _, a := range h.Peerstore().Addrs(r) {
		if !relayaddr.IsCircuit(a) && !manet.IsIP6LinkLocal(a) {
			base = append(base, a)
		}
	}
	suffix := ma.StringCast("/p2p/" + r.String() + "/p2p-circuit")
	var out []ma.Multiaddr
	for _, a := range ma.Unique(base) {
		if manet.IsIPLoopback(a) && !allLoopback(h.Network().ListenAddresses()) {
			continue
		}
		if len(out) == circuitAddrsPerRelay {
			break
		}
		out = append(out, a.Encapsulate(suffix))
	}
	return out
}

// directlyConnected reports whether h has a connection to p not through a relay.
func directlyConnected(h host.Host, p peer.ID) bool {
	for _, c := range h.Network().ConnsToPeer(p) {
		if !relayaddr.IsCircuit(c.RemoteMultiaddr()) {
			return true
		}
	}
	return false
}

func allLoopback(addrs []ma.Multiaddr) bool {
	for _, a := range addrs {
		if !relayaddr.IsCircuit(a) && !manet.IsIPLoopback(a) {
			return false
		}
	}
	return true
}

// relayed is this node's relayed addresses, for the address factory.
func (k *relayKeeper) relayed() []ma.Multiaddr {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []ma.Multiaddr
	for _, ri := range k.held {
		out = append(out, ri.Addrs...)
	}
	slices.SortFunc(out, func(a, b ma.Multiaddr) int { return a.Compare(b) })
	return out
}

// addrs is the host's address factory: --announce addresses first, then
// what libp2p found, then our relayed addresses.
func (k *relayKeeper) addrs(found []ma.Multiaddr) []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, len(k.announced)+len(found)+2*k.want)
	out = append(out, k.announced...)
	out = append(out, found...)
	out = append(out, k.relayed()...)
	return ma.Unique(out)
}

// info reports reachability and reservations.
func (k *relayKeeper) info() ReachabilityInfo {
	st, how := k.status()
	ri := ReachabilityInfo{Status: st, How: how}
	k.mu.Lock()
	for _, r := range k.held {
		c := *r
		c.Addrs = slices.Clone(r.Addrs)
		ri.Relays = append(ri.Relays, c)
	}
	k.mu.Unlock()
	slices.SortFunc(ri.Relays, func(a, b RelayInfo) int { return a.Since.Compare(b.Since) })
	return ri
}

// swarmOnlyACL makes our unlimited relay serve this swarm only: a peer may
// reserve a slot, or be relayed to someone, only if it is a member: it has
// announced in the swarm (a signed announcement in our peer table), or it
// speaks the swarm's query protocol (identify says so). The second rule
// matters after a relay restarts: its table is empty, and members reserve
// again before it has seen their announcements.
type swarmOnlyACL struct {
	k     *relayKeeper
	query libp2pproto.ID
	// members, in a closed swarm, is the only rule: a peer must have
	// shown its certificate (a reservation may come right after the
	// connection, while the handshake runs).
	members *membership.Membership
}

func (a swarmOnlyACL) member(p peer.ID) bool {
	if a.members != nil {
		ctx, cancel := context.WithTimeout(context.Background(), aclIdentifyWait)
		defer cancel()
		return a.members.Await(ctx, p)
	}
	if d := a.k.disc.Load(); d != nil {
		if _, ok := d.Table().Get(p); ok {
			return true
		}
	}
	h := a.k.host()
	if h == nil {
		return false
	}
	if a.speaks(h, p) {
		return true
	}
	// Identify may still be running on a connection just made.
	ids, ok := h.(interface{ IDService() identify.IDService })
	if !ok {
		return false
	}
	t := time.NewTimer(aclIdentifyWait)
	defer t.Stop()
	for _, c := range h.Network().ConnsToPeer(p) {
		select {
		case <-ids.IDService().IdentifyWait(c):
		case <-t.C:
			return a.speaks(h, p)
		}
	}
	return a.speaks(h, p)
}

func (a swarmOnlyACL) speaks(h host.Host, p peer.ID) bool {
	protos, err := h.Peerstore().SupportsProtocols(p, a.query)
	return err == nil && len(protos) > 0
}

func (a swarmOnlyACL) AllowReserve(p peer.ID, _ ma.Multiaddr) bool {
	ok := a.member(p)
	if !ok {
		relayLog.Debugw("relay reservation refused: not a swarm member", "peer", p)
	}
	return ok
}

func (a swarmOnlyACL) AllowConnect(src peer.ID, _ ma.Multiaddr, dest peer.ID) bool {
	return a.member(src) && a.member(dest)
}
