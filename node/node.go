// Package node is one mtor node: a libp2p host with discovery, a worker
// serving its backends, a router sending queries to the best peer, and an
// announcer telling the swarm what it can do. Every node runs the same
// code; flags switch roles on.
package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/canary"
	"github.com/mtor-swarm/mtor/node/dupconn"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/liveness"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/node/receiptback"
	"github.com/mtor-swarm/mtor/node/repunch"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

var log = logging.Logger("mtor/node")

// Defaults for a node.
const (
	DefaultGracePeriod  = 30 * time.Second
	healthProbeInterval = 10 * time.Second
	// handBackMargin is kept of the grace period to hand back queries.
	handBackMargin = time.Second
)

// DefaultListenAddrs are used when none are given.
func DefaultListenAddrs() []string {
	return []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"}
}

type config struct {
	dataDir          string
	key              crypto.PrivKey
	listen           []string
	join             []string
	swarm            string
	backends         []backend.Backend
	mdns             bool
	relay            bool
	reachability     Reachability
	announce         []ma.Multiaddr
	relays           int
	roles            []string
	version          string
	maxConcurrency   int
	maxQueue         int
	announceInterval time.Duration
	grace            time.Duration
	gpus             GPUSource
	meter            worker.EnergyMeter
	routerOpts       []router.Option
	discoveryOpts    []discovery.Option
	swarmView        bool
	watch            []string
	notify           func(Notice)
	joinTimeout      time.Duration
	canaryOpts       []canary.Option
	canaryOff        bool
	preferContrib    bool
	ledgerOpts       []ledger.Option
	members          *membership.Membership
	connGrace        time.Duration // the connection manager's grace period; 0: connGracePeriod
	dupOpts          []dupconn.Option
}

// Option configures a node.
type Option func(*config) error

// WithDataDir sets where the identity is kept.
func WithDataDir(dir string) Option { return func(c *config) error { c.dataDir = dir; return nil } }

// WithIdentity uses key instead of the data dir's identity (tests).
func WithIdentity(key crypto.PrivKey) Option {
	return func(c *config) error { c.key = key; return nil }
}

// WithListenAddrs sets the listen multiaddrs.
func WithListenAddrs(addrs ...string) Option {
	return func(c *config) error { c.listen = append(c.listen, addrs...); return nil }
}

// WithJoin adds --join values: multiaddrs with /p2p/ID, or join tokens.
func WithJoin(args ...string) Option {
	return func(c *config) error { c.join = append(c.join, args...); return nil }
}

// WithSwarm names the swarm; a join token's swarm must agree.
func WithSwarm(name string) Option {
	return func(c *config) error {
		if err := protocol.ValidateSwarm(name); err != nil {
			return err
		}
		c.swarm = name
		return nil
	}
}

// withConnGrace sets how long a new connection is spared by the
// connection manager's trim (tests, which cannot wait out a minute).
func withConnGrace(d time.Duration) Option {
	return func(c *config) error { c.connGrace = d; return nil }
}

// withDupConn tunes the closing of redundant connections (tests).
func withDupConn(opts ...dupconn.Option) Option {
	return func(c *config) error { c.dupOpts = append(c.dupOpts, opts...); return nil }
}

// WithBackends sets the model servers this node works for.
func WithBackends(bs ...backend.Backend) Option {
	return func(c *config) error { c.backends = append(c.backends, bs...); return nil }
}

// WithMDNS turns LAN discovery on or off (default on).
func WithMDNS(on bool) Option { return func(c *config) error { c.mdns = on; return nil } }

// WithRelayService serves circuit relay v2 for NAT'd peers.
func WithRelayService(on bool) Option { return func(c *config) error { c.relay = on; return nil } }

// WithReachability overrides AutoNAT: ReachabilityPublic (a port-forwarded
// or public node: no relay reservations), ReachabilityPrivate (always
// reserve on relays), or ReachabilityUnknown (the default: AutoNAT decides,
// and a node without any public address is presumed private meanwhile).
func WithReachability(r Reachability) Option {
	return func(c *config) error { c.reachability = r; return nil }
}

// WithAnnounceAddrs adds addresses this node is reachable on that it cannot
// see itself (a port forward on the home router: /ip4/PUBLIC/tcp/PORT).
// They come first in announcements and join tokens.
func WithAnnounceAddrs(addrs ...string) Option {
	return func(c *config) error {
		for _, s := range addrs {
			m, err := ParseAnnounceAddr(s)
			if err != nil {
				return err
			}
			c.announce = append(c.announce, m)
		}
		return nil
	}
}

// ParseAnnounceAddr checks an --announce value: a multiaddr without
// /p2p/<id>.
func ParseAnnounceAddr(s string) (ma.Multiaddr, error) {
	m, err := ma.NewMultiaddr(s)
	if err != nil {
		return nil, fmt.Errorf("announce address %q: %w", s, err)
	}
	if _, err := m.ValueForProtocol(ma.P_P2P); err == nil {
		return nil, fmt.Errorf("announce address %q: leave out /p2p/<id>", s)
	}
	return m, nil
}

// WithRelays sets how many relay reservations a private node holds
// (default 2).
func WithRelays(n int) Option {
	return func(c *config) error {
		if n < 1 || n > 8 {
			return fmt.Errorf("relays %d out of range [1, 8]", n)
		}
		c.relays = n
		return nil
	}
}

// WithRoles adds announced roles (bridge, bootstrap, ...).
func WithRoles(roles ...string) Option {
	return func(c *config) error { c.roles = append(c.roles, roles...); return nil }
}

// WithVersion sets the announced version.
func WithVersion(v string) Option { return func(c *config) error { c.version = v; return nil } }

// WithMaxConcurrency bounds queries this worker runs at once.
func WithMaxConcurrency(n int) Option {
	return func(c *config) error {
		if n < 1 || n > protocol.MaxAnnSlots {
			return fmt.Errorf("max concurrency %d: must be within [1, %d] (what an announcement may carry)", n, protocol.MaxAnnSlots)
		}
		c.maxConcurrency = n
		return nil
	}
}

// WithMaxQueue bounds queries waiting for a slot.
func WithMaxQueue(n int) Option {
	return func(c *config) error {
		if n < 0 || n > protocol.MaxAnnSlots {
			return fmt.Errorf("max queue %d: must be within [0, %d] (what an announcement may carry)", n, protocol.MaxAnnSlots)
		}
		c.maxQueue = n
		return nil
	}
}

// WithAnnounceInterval sets the heartbeat; entries expire after 3 of them.
func WithAnnounceInterval(d time.Duration) Option {
	return func(c *config) error {
		if d < 100*time.Millisecond || d > 3*time.Minute {
			return fmt.Errorf("announce interval %s out of range [100ms, 3m]", d)
		}
		c.announceInterval = d
		return nil
	}
}

// WithGracePeriod bounds how long Shutdown waits for queries in flight.
func WithGracePeriod(d time.Duration) Option {
	return func(c *config) error { c.grace = d; return nil }
}

// WithGPU adds GPU telemetry to announcements and energy to queries.
func WithGPU(g GPUSource, m worker.EnergyMeter) Option {
	return func(c *config) error { c.gpus, c.meter = g, m; return nil }
}

// WithPreferContributors has this node's worker, when queries queue for
// it, serve first the requesters that did more work for this node than it
// did for them (its ledger's balance; docs/operations.md "Accounting").
func WithPreferContributors(on bool) Option {
	return func(c *config) error { c.preferContrib = on; return nil }
}

// WithLedgerOptions configures the ledger (bounds, flush interval).
func WithLedgerOptions(opts ...ledger.Option) Option {
	return func(c *config) error { c.ledgerOpts = append(c.ledgerOpts, opts...); return nil }
}

// WithRouterOptions passes options to the router.
func WithRouterOptions(opts ...router.Option) Option {
	return func(c *config) error { c.routerOpts = append(c.routerOpts, opts...); return nil }
}

// WithDiscoveryOptions passes options to discovery.
func WithDiscoveryOptions(opts ...discovery.Option) Option {
	return func(c *config) error { c.discoveryOpts = append(c.discoveryOpts, opts...); return nil }
}

// WithSwarmView says whether the node follows every announcement of the
// swarm (default on): its peers list, model list and web page show the
// whole swarm, at a gossip cost that grows with the swarm. Off, it reads
// only the announcements of the models it routes to (learnt on the first
// query of each, or named by WithWatch), keeps a bounded number of workers
// of each and finds others through the DHT: a pure worker, or a bridge of
// a large swarm, pays for what it uses. See discovery.WithSwarmView.
func WithSwarmView(on bool) Option {
	return func(c *config) error { c.swarmView = on; return nil }
}

// WithWatch names models whose workers a node without the swarm view
// follows from the start, rather than from their first query.
func WithWatch(models ...string) Option {
	return func(c *config) error { c.watch = append(c.watch, models...); return nil }
}

// WithMembership closes the swarm to the members of m (see
// node/membership): revoked peers are refused connections, and peers that
// have not shown a certificate get no query streams, gossip or relay
// reservation, and their announcements and provider records are ignored.
// Its swarm must be the node's.
func WithMembership(m *membership.Membership) Option {
	return func(c *config) error { c.members = m; return nil }
}

// Node is a running mtor node.
type Node struct {
	cfg    config
	h      host.Host
	disc   *discovery.Discovery
	worker *worker.Worker
	router *router.Router
	canary *canary.Checker // honesty spot checks; nil when off
	ledger *ledger.Ledger
	ann    atomic.Pointer[announcer] // set once discovery and worker exist
	relays *relayKeeper
	punch  *punchLog
	// repunch makes new hole punches; it is told of every punch too.
	repunch *repunch.Repuncher
	live    *liveness.Checker
	prune   *dupconn.Pruner
	// bmu guards roles and watched, which a reload (SetBackends) changes,
	// and lets one reload run at a time.
	bmu   sync.Mutex
	roles []string
	// watched are the backends as the worker sees them, recording their
	// probes' results for State and notices.
	watched []*watchedBackend
	// joinPeers are the --join peers other than this node.
	joinPeers []peer.AddrInfo
	st        status
	lock      *os.File // the data dir's lock, nil without a data dir
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// New starts a node: host, discovery, worker, router and announcer.
func New(ctx context.Context, opts ...Option) (*Node, error) {
	cfg := config{
		mdns:             true,
		version:          "dev",
		maxConcurrency:   worker.DefaultMaxConcurrency,
		maxQueue:         worker.DefaultMaxQueue,
		announceInterval: DefaultAnnounceInterval,
		swarmView:        true,
		grace:            DefaultGracePeriod,
		joinTimeout:      DefaultJoinTimeout,
		relays:           DefaultRelays,
	}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	if len(cfg.listen) == 0 {
		cfg.listen = DefaultListenAddrs()
	}
	swarm, boot, err := parseJoins(cfg.swarm, cfg.join)
	if err != nil {
		return nil, err
	}
	cfg.swarm = swarm
	if cfg.members != nil && cfg.members.Swarm() != swarm {
		return nil, fmt.Errorf("membership of swarm %q, but the node is in swarm %q", cfg.members.Swarm(), swarm)
	}
	// undo holds the cleanups of what New has started, run last first
	// when it fails.
	var undo []func()
	ok := false
	defer func() {
		if ok {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}()
	var lock *os.File
	if cfg.dataDir != "" {
		if lock, err = lockDataDir(cfg.dataDir); err != nil {
			return nil, err
		}
		undo = append(undo, func() { lock.Close() })
	}
	if cfg.key == nil {
		if cfg.dataDir == "" {
			return nil, errors.New("no data dir and no identity given")
		}
		if cfg.key, err = LoadOrCreateIdentity(cfg.dataDir); err != nil {
			return nil, err
		}
	}
	roles := cfg.roles
	if len(cfg.backends) > 0 {
		roles = append([]string{"worker"}, roles...)
	}
	if cfg.relay {
		roles = append(roles, "relay")
	}

	qproto := protocol.QueryProtocol(swarm)
	relays := newRelayKeeper(cfg.reachability, cfg.announce, cfg.relays)
	punches := newPunchLog()
	if cfg.relay {
		relays.forced = ReachabilityPublic
	}
	hc := hostConfig{
		key: cfg.key, listen: cfg.listen, query: qproto, width: cfg.maxConcurrency + cfg.maxQueue, relay: cfg.relay,
		reachability: cfg.reachability, relayACL: swarmOnlyACL{k: relays, query: qproto, members: cfg.members}, addrs: relays.addrs,
		punches: punches, lean: !cfg.swarmView && !cfg.relay, grace: cfg.connGrace,
	}
	if cfg.members != nil {
		hc.gater = cfg.members.Gater()
	}
	h, err := newHost(hc)
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() { h.Close() })
	relays.hv.Store(h)
	repunches := repunch.New(h, repunch.WithSafe(reconnectSafe(cfg.swarm)))
	punches.attach(h, repunches)
	// Before discovery: its failed pings hand connections to it.
	live := liveness.New(h)
	undo = append(undo, live.Close)
	prune := dupconn.New(h, liveness.Probe, append([]dupconn.Option{dupconn.WithExpendable(expendable(cfg.swarm)...)}, cfg.dupOpts...)...)
	repunches.Attach()
	undo = append(undo, repunches.Close)
	relays.probe = live.Suspect
	for _, ai := range boot {
		h.ConnManager().Protect(ai.ID, "mtor-bootstrap")
	}
	led, err := ledger.Open(cfg.dataDir, h.ID(), cfg.ledgerOpts...)
	if err != nil {
		return nil, fmt.Errorf("open the ledger: %w", err)
	}
	n := &Node{cfg: cfg, h: h, relays: relays, punch: punches, repunch: repunches, lock: lock, roles: roles, ledger: led, prune: prune}
	n.st.joined, n.st.joinFailed = make(chan struct{}), make(chan struct{})
	// A node given its own token (a restart script) has no one to join.
	n.joinPeers = slices.DeleteFunc(slices.Clone(boot), func(ai peer.AddrInfo) bool { return ai.ID == h.ID() })
	n.st.joining = len(n.joinPeers) > 0
	n.ctx, n.cancel = context.WithCancel(context.Background())
	undo = append(undo, n.cancel)
	if cfg.members != nil {
		cfg.members.OnNotice(func(warning bool, text string) {
			n.notify(NoticeMembership, warning, "%s", text)
		})
		// Before discovery dials anyone: every connection gets its
		// handshake.
		if err := cfg.members.Attach(n.ctx, h); err != nil {
			return nil, fmt.Errorf("membership: %w", err)
		}
	}
	// Subscribed before discovery starts dialling, so that no verdict is
	// missed.
	reachSub, err := h.EventBus().Subscribe([]any{new(event.EvtLocalReachabilityChanged), new(event.EvtLocalAddressesUpdated)})
	if err != nil {
		return nil, fmt.Errorf("subscribe to reachability events: %w", err)
	}
	undo = append(undo, func() { reachSub.Close() })

	served := newBusyPeers() // the worker's streams, by peer
	dopts := append([]discovery.Option{
		discovery.WithSwarm(swarm),
		discovery.WithBootstrap(boot),
		discovery.WithMDNS(cfg.mdns),
		discovery.WithAnnounceTTL(max(3*cfg.announceInterval, protocol.MinAnnounceTTL)),
		discovery.WithMemberProtocol(qproto),
		discovery.WithSwarmView(cfg.swarmView),
		discovery.WithWatch(cfg.watch...),
		discovery.WithOnTopicPeerJoin(func(peer.ID) {
			if a := n.announcer(); a != nil {
				a.refresh()
			}
		}),
		discovery.WithSuspect(live.Suspect),
		discovery.WithReconnecting(repunches.Reconnecting),
		discovery.WithBusy(func(p peer.ID) bool { return h.ConnManager().IsProtected(p, router.InFlightTag) || served.has(p) }),
	}, cfg.discoveryOpts...)
	if cfg.members != nil {
		dopts = append(dopts, discovery.WithMembers(cfg.members))
	}
	if n.disc, err = discovery.New(n.ctx, h, dopts...); err != nil {
		return nil, fmt.Errorf("start discovery: %w", err)
	}
	undo = append(undo, func() { n.disc.Close() })
	if cfg.members != nil {
		if err := cfg.members.StartGossip(n.ctx, n.disc.PubSub()); err != nil {
			return nil, fmt.Errorf("membership: %w", err)
		}
	}

	relays.disc.Store(n.disc)

	wopts := []worker.Option{
		worker.WithMaxConcurrency(cfg.maxConcurrency),
		worker.WithMaxQueue(cfg.maxQueue),
		worker.WithVersion(cfg.version),
		worker.WithServing(served.add),
		worker.WithOnChange(func() {
			if a := n.announcer(); a != nil {
				a.changed()
			}
		}),
	}
	if cfg.meter != nil {
		wopts = append(wopts, worker.WithEnergyMeter(cfg.meter))
	}
	wopts = append(wopts, worker.WithSigner(cfg.key),
		worker.WithOnServed(func(r *pb.Receipt) { led.Record(ledger.Served, r) }))
	if cfg.preferContrib {
		wopts = append(wopts, worker.WithPreferContributors(led.Balance))
	}
	watched := make([]backend.Backend, len(cfg.backends))
	for i, b := range cfg.backends {
		w := watchBackend(b, n.onBackendChange)
		n.watched = append(n.watched, w)
		watched[i] = w
	}
	n.worker = worker.New(watched, wopts...)
	n.worker.Refresh(ctx)
	h.SetStreamHandler(qproto, n.membersOnly(n.worker.HandleStream))

	n.live = live
	// Countersigned receipts go to the ledger and back to their workers;
	// the worker side takes those of answers it served.
	// Receipts of queries marked router.CountersignLater come unsigned
	// and are countersigned by the sender, in batches.
	returns := receiptback.NewSender(h, protocol.ReceiptProtocol(swarm),
		receiptback.WithBatches(protocol.ReceiptBatchProtocol(swarm), cfg.key, func(r *pb.Receipt) { led.Record(ledger.Consumed, r) }))
	takeReceipts := receiptback.NewReceiver(h.ID(), led.Pending, led.Countersigned).HandleStream
	h.SetStreamHandler(protocol.ReceiptProtocol(swarm), takeReceipts)
	h.SetStreamHandler(protocol.ReceiptBatchProtocol(swarm), takeReceipts)
	// The local worker is always there, so that backends a reload adds
	// are served here too; without models it is never chosen.
	ropts := []router.Option{router.WithProviders(n.disc), router.WithSeeker(n.disc), router.WithMeasurer(n.disc), router.WithPeerFinder(n.disc.DHT()), router.WithCatalog(catalogAdapter{n.disc}), router.WithConnChecker(n.live), router.WithHolePunches(punches),
		router.WithLocal(localWorker{n.worker}),
		router.WithReceipts(cfg.key, func(r *pb.Receipt) {
			if receipt.Countersigned(r) {
				led.Record(ledger.Consumed, r)
			}
			if peer.ID(r.GetWorker()) != h.ID() {
				if !receipt.Countersigned(r) {
					// The sender countersigns it while the query's
					// caller may still read the Done it is in.
					r = proto.CloneOf(r)
				}
				returns.Add(r)
			}
		})}
	chk, copts := canaryRouterOptions(&cfg)
	ropts = append(ropts, copts...)
	n.router = router.New(h, qproto, tableAdapter{n.disc.Table()}, append(ropts, cfg.routerOpts...)...)
	n.canary = chk
	ann := newAnnouncer(n.disc, n.worker, cfg.gpus, roles, cfg.version, cfg.announceInterval)
	ann.addrs = h.Addrs
	n.ann.Store(ann)
	// A new relayed address (or a lost one) is announced at once: it is
	// how the rest of the swarm reaches a node behind NAT.
	relays.onChange = ann.changed
	addrSub, err := h.EventBus().Subscribe(new(event.EvtLocalAddressesUpdated), eventbus.Name("mtor/node addrs"))
	if err != nil {
		return nil, fmt.Errorf("watch addresses: %w", err)
	}

	n.goRun(func() { ann.run(n.ctx) })
	n.goRun(func() { led.Run(n.ctx) })
	n.goRun(func() { returns.Run(n.ctx) })
	n.goRun(func() { relays.run(n.ctx) })
	n.goRun(func() { watchAddrs(n.ctx, addrSub, ann) })
	n.goRun(n.probeLoop)
	n.goRun(func() { prune.Run(n.ctx) })
	n.goRun(func() { repunches.Run(n.ctx) })
	if chk != nil {
		n.goRun(func() { chk.Run(n.ctx, n.router) })
	}
	n.goRun(func() { n.reachLoop(reachSub) })
	if len(n.joinPeers) > 0 {
		n.goRun(func() { n.joinLoop(n.joinPeers) })
	}
	ok = true
	log.Infow("node started", "peer", h.ID(), "swarm", swarm, "backends", len(cfg.backends), "roles", roles)
	return n, nil
}

// memberWait bounds how long a query stream waits for its peer's
// certificate: the handshake runs as the connection comes up, so the
// first query of a new peer may come before it has finished.
const memberWait = 5 * time.Second

// membersOnly serves a stream protocol to members of a closed swarm only.
func (n *Node) membersOnly(h network.StreamHandler) network.StreamHandler {
	m := n.cfg.members
	if m == nil {
		return h
	}
	return func(s network.Stream) {
		ctx, cancel := context.WithTimeout(n.ctx, memberWait)
		ok := m.Await(ctx, s.Conn().RemotePeer())
		cancel()
		if !ok {
			log.Debugw("query stream refused: not a swarm member", "peer", s.Conn().RemotePeer())
			s.Reset()
			return
		}
		h(s)
	}
}

// Membership is the closed swarm's membership, nil in an open swarm.
func (n *Node) Membership() *membership.Membership { return n.cfg.members }

func (n *Node) goRun(f func()) {
	n.wg.Add(1)
	go func() { defer n.wg.Done(); f() }()
}

// probeLoop refreshes backend health and model lists.
func (n *Node) probeLoop() {
	t := time.NewTicker(healthProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
			n.worker.Refresh(n.ctx)
		}
	}
}

// parseJoins resolves --join values and the swarm name they imply.
func parseJoins(swarm string, joins []string) (string, []peer.AddrInfo, error) {
	var boot []peer.AddrInfo
	tokenSwarm := ""
	for _, j := range joins {
		s, infos, err := discovery.ParseJoin(j)
		if err != nil {
			return "", nil, fmt.Errorf("--join %q: %w", j, err)
		}
		if s != "" {
			if tokenSwarm != "" && tokenSwarm != s {
				return "", nil, fmt.Errorf("join tokens name different swarms: %q and %q", tokenSwarm, s)
			}
			tokenSwarm = s
		}
		boot = append(boot, infos...)
	}
	switch {
	case swarm == "" && tokenSwarm == "":
		swarm = protocol.DefaultSwarm
	case swarm == "":
		swarm = tokenSwarm
	case tokenSwarm != "" && tokenSwarm != swarm:
		return "", nil, fmt.Errorf("--swarm %q but the join token is for swarm %q", swarm, tokenSwarm)
	}
	return swarm, boot, nil
}

// watchAddrs asks for a publish whenever libp2p's view of our addresses
// changes (an observed public address, a new listener).
func watchAddrs(ctx context.Context, sub event.Subscription, ann *announcer) {
	defer sub.Close()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-sub.Out():
			if !ok {
				return
			}
			ann.changed()
		}
	}
}

// announcer is nil until New has built it; callbacks may fire before.
func (n *Node) announcer() *announcer { return n.ann.Load() }

// ID is the node's peer ID.
func (n *Node) ID() peer.ID { return n.h.ID() }

// Host is the libp2p host.
func (n *Node) Host() host.Host { return n.h }

// SwarmName is the swarm this node belongs to.
func (n *Node) SwarmName() string { return n.cfg.swarm }

// Router routes queries into the swarm.
func (n *Node) Router() *router.Router { return n.router }

// Ledger is this node's account of work consumed and served per peer.
func (n *Node) Ledger() *ledger.Ledger { return n.ledger }

// Worker is this node's worker.
func (n *Node) Worker() *worker.Worker { return n.worker }

// Discovery is this node's discovery.
func (n *Node) Discovery() *discovery.Discovery { return n.disc }

// Backends lists the configured backends.
func (n *Node) Backends() []backend.Backend {
	n.bmu.Lock()
	defer n.bmu.Unlock()
	return slices.Clone(n.cfg.backends)
}

// Addrs are the node's listen addresses ending in /p2p/<id>.
func (n *Node) Addrs() []ma.Multiaddr {
	addrs, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: n.h.ID(), Addrs: n.h.Addrs()})
	if err != nil {
		return nil
	}
	return addrs
}

// JoinLine is a join token for this node: its swarm and addresses.
// Loopback addresses are left out (they would make another machine dial
// itself) unless the node has no other.
func (n *Node) JoinLine() string {
	return discovery.EncodeJoinToken(n.cfg.swarm, []peer.AddrInfo{{ID: n.h.ID(), Addrs: shareable(n.h.Addrs())}})
}

// shareable drops loopback addresses from addrs unless nothing else is left.
func shareable(addrs []ma.Multiaddr) []ma.Multiaddr {
	out := make([]ma.Multiaddr, 0, len(addrs))
	for _, a := range addrs {
		if !manet.IsIPLoopback(a) {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return addrs
	}
	return out
}

// Reachability says whether peers outside this node's network can dial it
// (public, private or unknown, and how it knows) and which relays it holds
// reservations on: what `mtor node` prints at start and /v1/id reports.
func (n *Node) Reachability() ReachabilityInfo { return n.relays.info() }

// Shutdown stops gracefully: Drain, then Close.
func (n *Node) Shutdown(ctx context.Context) error {
	n.Drain(ctx)
	return n.Close()
}

// Drain announces that this node is draining, refuses new queries with
// BUSY and waits for the queries in flight. Shortly before the grace
// period (or ctx) runs out it hands the unfinished ones back: each ends
// with a retryable UNAVAILABLE, so its client moves it to another worker
// instead of losing it when the process exits. The host stays up, so that
// queries this node routes elsewhere (its bridge's) can still finish.
func (n *Node) Drain(ctx context.Context) {
	n.worker.Drain()
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	n.announcer().publish(pctx, true)
	cancel()
	grace := n.cfg.grace
	if dl, ok := ctx.Deadline(); ok {
		grace = min(grace, time.Until(dl))
	}
	// Kept for the hand-back: the error frames written and read before
	// the connections close.
	margin := max(min(handBackMargin, grace/4), 100*time.Millisecond)
	wctx, cancel := context.WithTimeout(ctx, grace-margin)
	defer cancel()
	if err := n.worker.Wait(wctx); err != nil {
		k := n.worker.HandBack()
		log.Warnw("grace period running out; handing unfinished queries back", "queries", k, "grace", n.cfg.grace)
		hctx, hcancel := context.WithTimeout(context.WithoutCancel(ctx), margin)
		_ = n.worker.Wait(hctx)
		hcancel()
	}
}

// Close stops the node at once.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		n.cancel()
		n.h.RemoveStreamHandler(protocol.QueryProtocol(n.cfg.swarm))
		n.h.RemoveStreamHandler(protocol.ReceiptProtocol(n.cfg.swarm))
		n.h.RemoveStreamHandler(protocol.ReceiptBatchProtocol(n.cfg.swarm))
		err := n.disc.Close()
		n.wg.Wait()
		n.live.Close()
		lerr := n.ledger.Flush()
		n.closeErr = errors.Join(err, lerr, n.h.Close())
		if n.lock != nil {
			n.lock.Close()
		}
	})
	return n.closeErr
}

// tableAdapter shows the discovery peer table to the router.
type tableAdapter struct{ t *discovery.PeerTable }

func (a tableAdapter) Candidates() []router.Candidate { return candidates(a.t.Snapshot()) }

// ModelCandidates makes the adapter a router.ModelTable.
func (a tableAdapter) ModelCandidates(model string) []router.Candidate {
	return candidates(a.t.SnapshotModel(model))
}

func candidates(snap []discovery.Entry) []router.Candidate {
	out := make([]router.Candidate, len(snap))
	for i, e := range snap {
		out[i] = router.Candidate{Peer: e.Peer, Announce: e.Announce, RTT: e.RTT, RTTRelayed: e.RTTRelayed, Received: e.Received}
	}
	return out
}

// localWorker adapts the worker to the router's Local interface.
type localWorker struct{ w *worker.Worker }

func (l localWorker) Serve(ctx context.Context, req *pb.QueryRequest, emit func(*pb.Event) error) (*pb.Done, error) {
	return l.w.Serve(ctx, req, emit)
}
