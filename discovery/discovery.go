package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipfs/go-cid"
	logging "github.com/ipfs/go-log/v2"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/host/eventbus"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/discovery")

// bootstrapTag protects join peers in the connection manager.
const bootstrapTag = "mtor-bootstrap"

const (
	defaultFindLimit = 20
	maxFindLimit     = 100
	subBuffer        = 256 // gossipsub subscription buffer, in messages
	connEventBuffer  = 256
	// validateQueue is how many received messages may wait for
	// validation (their signature, then our validator). Past it
	// gossipsub drops them ("validation queue full"). Its default, 32,
	// lost a swarm view more than half of what it heard in a simulated
	// swarm of 500 (heartbeats arrive in bursts, from each worker and
	// from the other views), so workers fell out of its table at their
	// TTL. A waiting message is one already received: at most
	// validateQueue × DefaultMaxPubSubMessage held, an announcement's
	// 1 KiB or so in practice.
	validateQueue = 256
)

// Discovery runs the DHT, the announce topic and the peer table of one host.
type Discovery struct {
	h     host.Host
	cfg   config
	dht   *dht.IpfsDHT
	ps    *pubsub.PubSub
	topic *pubsub.Topic        // the swarm's announce topic, always joined
	sub   *pubsub.Subscription // to topic, with the swarm view only
	// presence is subscribed by every node and published on by none: a
	// peer there has a working gossip link with us (rejoin.go).
	presence    *pubsub.Topic
	presenceSub *pubsub.Subscription
	topics      topicSet // model topics
	cat         *catalog // the model catalogue (catalog.go); nil when off
	val         *announceValidator
	table       *PeerTable
	traffic     *trafficTracer
	mdns        interface{ Close() error }
	lookups     atomic.Int64 // provider look-ups of watched models started (lookUp)

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	pubMu   sync.Mutex // orders stamping and publishing, so seqs leave in order
	lastSeq uint64

	closeOnce sync.Once
	closeErr  error
}

// New starts discovery on h: the DHT, gossipsub with the announce topic and
// its validator, the peer table with its sweeper, RTT pings, mDNS when
// enabled, and a background Bootstrap. Everything stops on Close or when
// ctx ends.
func New(ctx context.Context, h host.Host, opts ...Option) (*Discovery, error) {
	cfg := defaults()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("discovery option: %w", err)
		}
	}
	d := &Discovery{
		h:       h,
		cfg:     cfg,
		val:     newAnnounceValidator(cfg.maxEntries, cfg.now),
		table:   newPeerTable(h.ID(), cfg.maxEntries, cfg.now),
		traffic: &trafficTracer{},
		topics:  topicSet{models: map[string]*modelTopic{}},
	}
	d.table.lim = cfg.limits
	if cfg.members != nil {
		d.table.allow = func(p peer.ID, a *pb.Announce) bool { return rolesGranted(cfg.members, p, a) }
	}
	if !cfg.swarmView {
		d.table.watchOnly = true
	}
	d.val.every, d.val.burst = cfg.announceEvery, float64(cfg.announceBurst)
	d.val.keep = func(author, from peer.ID, a *pb.Announce) bool {
		return d.table.wouldTake(author, d.origin(author, from), a)
	}
	d.ctx, d.cancel = context.WithCancel(ctx)
	ok := false
	defer func() {
		if !ok {
			_ = d.Close()
		}
	}()

	var err error
	topicName := protocol.AnnounceTopic(cfg.swarm)
	psOpts := []pubsub.Option{
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithMaxMessageSize(DefaultMaxPubSubMessage),
		// Send our own announcements to every topic peer, not only the
		// mesh: they are small and rare, and without this one published
		// before the mesh has formed is lost to the peers grafted later.
		pubsub.WithFloodPublish(true),
		pubsub.WithValidateQueueSize(cmp.Or(cfg.validateQueue, validateQueue)),
	}
	if cfg.outboundQueue > 0 {
		psOpts = append(psOpts, pubsub.WithPeerOutboundQueueSize(cfg.outboundQueue))
	}
	presenceName := protocol.PresenceTopic(cfg.swarm)
	params, thresholds := scoreParams([]string{topicName, presenceName}, cfg.ipColocation, cfg.ipWhitelist)
	if cfg.members != nil {
		// No mesh, gossip or IWANT answers for peers that have not
		// shown a certificate, and (their score below the publish
		// threshold) none of our own messages either.
		psOpts = append(psOpts, pubsub.WithPeerFilter(func(p peer.ID, _ string) bool { return cfg.members.IsMember(p) }))
		params.AppSpecificScore = func(p peer.ID) float64 {
			if cfg.members.IsMember(p) {
				return 0
			}
			return nonMemberScore
		}
		params.AppSpecificWeight = 1
	}
	psOpts = append(psOpts, pubsub.WithPeerScore(params, thresholds), pubsub.WithRawTracer(d.traffic))
	if cfg.scoreInspect != nil {
		psOpts = append(psOpts, pubsub.WithPeerScoreInspect(cfg.scoreInspect, cfg.scoreInspectPeriod))
	}
	d.ps, err = pubsub.NewGossipSub(d.ctx, h, psOpts...)
	if err != nil {
		return nil, fmt.Errorf("start gossipsub: %w", err)
	}
	// The DHT starts after gossipsub: it dials its bootstrap peers at
	// once, and a connection identified before gossipsub has registered
	// its protocols leaves the peer out of gossip (pubsub adds peers on
	// identify), a link only the repair of rejoin.go mends.
	d.dht, err = dht.New(h,
		dht.ProtocolPrefix(protocol.DHTPrefix(cfg.swarm)),
		dht.Mode(cfg.dhtMode),
		dht.BootstrapPeers(cfg.bootstrap...),
		// We only use provider records; refusing values removes an
		// unneeded way to store data on our nodes.
		dht.DisableValues(),
	)
	if err != nil {
		return nil, fmt.Errorf("start dht: %w", err)
	}

	// Inline: the check is cheap, and goroutine-free validation cannot be
	// throttled into dropping messages.
	if err := d.ps.RegisterTopicValidator(topicName, d.validate, pubsub.WithValidatorInline(true)); err != nil {
		return nil, fmt.Errorf("register announce validator: %w", err)
	}
	if d.topic, err = d.ps.Join(topicName); err != nil {
		return nil, fmt.Errorf("join %s: %w", topicName, err)
	}
	if cfg.swarmView {
		if d.sub, err = d.topic.Subscribe(pubsub.WithBufferSize(subBuffer)); err != nil {
			return nil, fmt.Errorf("subscribe %s: %w", topicName, err)
		}
	}
	// Nothing is published on the presence topic: whatever arrives there
	// is refused, and its sender penalised.
	if err := d.ps.RegisterTopicValidator(presenceName, func(context.Context, peer.ID, *pubsub.Message) bool { return false }, pubsub.WithValidatorInline(true)); err != nil {
		return nil, fmt.Errorf("register presence validator: %w", err)
	}
	if d.presence, err = d.ps.Join(presenceName); err != nil {
		return nil, fmt.Errorf("join %s: %w", presenceName, err)
	}
	if d.presenceSub, err = d.presence.Subscribe(pubsub.WithBufferSize(1)); err != nil {
		return nil, fmt.Errorf("subscribe %s: %w", presenceName, err)
	}

	if err := d.startCatalog(); err != nil {
		return nil, err
	}

	connSub, err := h.EventBus().Subscribe(new(event.EvtPeerConnectednessChanged), eventbus.BufSize(connEventBuffer), eventbus.Name("mtor/discovery"))
	if err != nil {
		return nil, fmt.Errorf("subscribe to connectedness events: %w", err)
	}

	if cfg.onTopicJoin != nil {
		th, err := d.topic.EventHandler()
		if err != nil {
			return nil, fmt.Errorf("watch %s: %w", topicName, err)
		}
		// Every node with an announcer publishes on the swarm topic.
		d.goRun(func() { d.topicJoinLoop(d.ctx, topicName, th, th.Cancel, func() bool { return true }) })
	}

	if d.sub != nil {
		d.goRun(func() { d.readLoop(d.sub) })
	}
	d.goRun(func() { d.connLoop(connSub) })
	d.goRun(d.protectLoop)
	d.goRun(d.probeLoop)
	d.goRun(d.sweepLoop)
	if cfg.memberProto != "" {
		d.goRun(d.rejoinLoop)
	}
	if cfg.pingInterval > 0 {
		d.goRun(d.pingLoop)
	}
	if cfg.mdns {
		m, err := d.startMDNS()
		if err != nil {
			// A host without a multicast interface still works through
			// join peers; say so and go on.
			log.Warnw("mDNS not started", "err", err)
		} else {
			d.mdns = m
		}
	}
	d.goRun(func() {
		if err := d.Bootstrap(d.ctx); err != nil && d.ctx.Err() == nil {
			log.Warnw("bootstrap", "err", err)
		}
	})
	for _, m := range cfg.watch {
		if err := d.Watch(m); err != nil {
			return nil, fmt.Errorf("watch %q: %w", m, err)
		}
	}
	ok = true
	log.Infow("discovery started", "swarm", cfg.swarm, "topic", topicName, "swarm_view", cfg.swarmView, "per_model", cfg.limits.perModel, "dht", protocol.DHTPrefix(cfg.swarm), "bootstrap", len(cfg.bootstrap), "mdns", cfg.mdns)
	return d, nil
}

func (d *Discovery) goRun(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// Swarm is the swarm name this discovery runs in.
func (d *Discovery) Swarm() string { return d.cfg.swarm }

// Traffic is the gossip sent and received so far.
func (d *Discovery) Traffic() Traffic { return d.traffic.snapshot() }

// Table is the peer table.
func (d *Discovery) Table() *PeerTable { return d.table }

// DHT is the swarm's Kademlia DHT, for use as a content router.
func (d *Discovery) DHT() *dht.IpfsDHT { return d.dht }

// PubSub is the host's gossipsub instance; a host should have only one.
func (d *Discovery) PubSub() *pubsub.PubSub { return d.ps }

// Publish stamps a with the next seq, the current time and the configured
// TTL, puts it in the table as this node's entry at once, and gossips it.
// a is modified; the caller must not modify it afterwards.
func (d *Discovery) Publish(ctx context.Context, a *pb.Announce) error {
	if a == nil {
		return errors.New("publish: nil announce")
	}
	d.pubMu.Lock()
	defer d.pubMu.Unlock()
	now := d.cfg.now()
	// Seeded from the clock so that a restarted node, whose seq would
	// otherwise start again at 1, is not ignored as stale by its peers.
	seq := max(d.lastSeq+1, uint64(now.UnixMilli())*1000)
	a.Seq = seq
	a.TimeUnixMs = now.UnixMilli()
	a.TtlMs = uint32(d.cfg.announceTTL / time.Millisecond)
	if err := protocol.ValidateAnnounce(a, now); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	data, err := proto.Marshal(a)
	if err != nil {
		return fmt.Errorf("publish: marshal announce: %w", err)
	}
	if len(data) > protocol.MaxAnnounce {
		return fmt.Errorf("publish: announce of %d bytes over limit %d", len(data), protocol.MaxAnnounce)
	}
	d.lastSeq = seq
	d.table.upsert(d.h.ID(), a, now)
	if err := d.topic.Publish(ctx, data); err != nil {
		return fmt.Errorf("publish announce: %w", err)
	}
	if err := d.publishModels(ctx, a, data); err != nil {
		return fmt.Errorf("publish announce: %w", err)
	}
	return nil
}

// modelCID is the DHT key of a model: keyCID of protocol.ModelKey(swarm, model).
func modelCID(swarm, model string) (cid.Cid, error) {
	return keyCID(protocol.ModelKey(swarm, model))
}

// keyCID is a DHT key: a raw CID of the sha256 of key.
func keyCID(key string) (cid.Cid, error) {
	mh, err := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
	if err != nil {
		return cid.Undef, fmt.Errorf("hash key %s: %w", key, err)
	}
	return cid.NewCidV1(cid.Raw, mh), nil
}

// Provide announces in the DHT that this node serves model. Records expire
// (48 h in kad-dht); call it again periodically.
func (d *Discovery) Provide(ctx context.Context, model string) error {
	if err := protocol.ValidateModelName(model); err != nil {
		return err
	}
	c, err := modelCID(d.cfg.swarm, model)
	if err != nil {
		return err
	}
	d.awaitRouting(ctx)
	if err := d.dht.Provide(ctx, c, true); err != nil {
		return fmt.Errorf("provide %q: %w", model, err)
	}
	return nil
}

// ProvideRelay announces in the DHT that this node is one of the swarm's
// relays, for the nodes without the swarm view (WatchRelays). Records
// expire; call it again periodically.
func (d *Discovery) ProvideRelay(ctx context.Context) error {
	c, err := keyCID(protocol.RelayKey(d.cfg.swarm))
	if err != nil {
		return err
	}
	d.awaitRouting(ctx)
	if err := d.dht.Provide(ctx, c, true); err != nil {
		return fmt.Errorf("provide the relay key: %w", err)
	}
	return nil
}

// FindProviders looks up in the DHT up to limit peers (default 20, at most
// 100) that provide model, other than this node. It returns what it found
// when ctx ends, with ctx's error only if it found nothing. A node without
// the swarm view starts watching model: the router asks for providers when
// its table has no worker of the model, which is when it needs them.
//
// For learnWindow after the watch starts (learnWindowListed for a model
// the swarm's catalogue lists), a look-up that finds nothing is tried
// again until ctx ends: the model's workers may have started
// just now, their provider records not yet put. It ends early, with
// nothing, once the model's topic has brought a worker to the table,
// where the caller finds it.
func (d *Discovery) FindProviders(ctx context.Context, model string, limit int) ([]peer.AddrInfo, error) {
	if err := d.Watch(model); err != nil {
		log.Debugw("watch model", "model", model, "err", err)
	}
	since := d.watchedSince(model)
	wait := learnRetryMin
	for {
		ais, err := d.findProviders(ctx, model, limit)
		window := learnWindow
		if _, listed := d.CatalogModel(model); listed {
			window = learnWindowListed
		}
		if len(ais) > 0 || err != nil || since.IsZero() || time.Since(since) >= window || d.tableServes(model) {
			return ais, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("find providers of %q: %w", model, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, learnRetryMax)
	}
}

// Spacing of the look-ups FindProviders tries again while learning.
const (
	learnRetryMin = 200 * time.Millisecond
	learnRetryMax = time.Second
)

// tableServes reports whether the table holds another peer announcing
// model.
func (d *Discovery) tableServes(model string) bool {
	kept := d.table.keptOf(model)
	delete(kept, d.h.ID())
	return len(kept) > 0
}

// awaitRouting waits, at most routingWait and while ctx lasts, for the
// DHT routing table's first peer when this node has connections: a DHT
// operation on an empty table fails at once, and a node that has just
// joined has its join peer there only once identify is done. The DHT
// offers no event for it, hence the polling.
func (d *Discovery) awaitRouting(ctx context.Context) {
	if d.dht.RoutingTable().Size() > 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, routingWait)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for d.dht.RoutingTable().Size() == 0 && len(d.h.Network().Peers()) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (d *Discovery) findProviders(ctx context.Context, model string, limit int) ([]peer.AddrInfo, error) {
	if err := protocol.ValidateModelName(model); err != nil {
		return nil, err
	}
	c, err := modelCID(d.cfg.swarm, model)
	if err != nil {
		return nil, err
	}
	return d.findProvidersOf(ctx, c, limit, fmt.Sprintf("%q", model))
}

// findProvidersOf is findProviders for DHT key c, named what in errors.
func (d *Discovery) findProvidersOf(ctx context.Context, c cid.Cid, limit int, what string) ([]peer.AddrInfo, error) {
	if limit <= 0 {
		limit = defaultFindLimit
	}
	limit = min(limit, maxFindLimit)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out []peer.AddrInfo
	d.awaitRouting(ctx)
	// Ask for one more than limit: our own record may be among them.
	for ai := range d.dht.FindProvidersAsync(ctx, c, limit+1) {
		if ai.ID == d.h.ID() {
			continue
		}
		out = append(out, ai)
		if len(out) == limit {
			break
		}
	}
	if len(out) == 0 && ctx.Err() != nil {
		return nil, fmt.Errorf("find providers of %s: %w", what, ctx.Err())
	}
	if d.cfg.members != nil {
		out = d.onlyMembers(ctx, out)
	}
	return out, nil
}

// onlyMembers keeps the providers that are members of a closed swarm:
// anyone can put a provider record, so one of a peer not yet known is
// dialled, and kept if it presents a certificate in time.
func (d *Discovery) onlyMembers(ctx context.Context, ais []peer.AddrInfo) []peer.AddrInfo {
	keep := make([]bool, len(ais))
	var wg sync.WaitGroup
	for i, ai := range ais {
		if d.cfg.members.IsMember(ai.ID) {
			keep[i] = true
			continue
		}
		if d.cfg.members.Revoked(ai.ID) {
			continue
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, d.cfg.dialTimeout)
			defer cancel()
			if err := d.h.Connect(cctx, ai); err != nil {
				return
			}
			keep[i] = d.cfg.members.Await(cctx, ai.ID)
		})
	}
	wg.Wait()
	out := ais[:0]
	for i, ai := range ais {
		if keep[i] {
			out = append(out, ai)
		} else {
			log.Debugw("provider ignored: not a swarm member", "peer", ai.ID)
		}
	}
	return out
}

// Bootstrap dials the join peers (concurrently, each with the dial
// timeout) and bootstraps the DHT. Unreachable peers are logged; it fails
// only when there were join peers and none could be reached.
func (d *Discovery) Bootstrap(ctx context.Context) error {
	peers := d.cfg.bootstrap
	var (
		mu      sync.Mutex
		reached int
		errs    []error
		wg      sync.WaitGroup
		sem     = make(chan struct{}, maxDialConcurrency)
	)
	for _, ai := range peers {
		if ai.ID == d.h.ID() {
			continue
		}
		d.h.ConnManager().Protect(ai.ID, bootstrapTag)
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			dctx, cancel := context.WithTimeout(ctx, d.cfg.dialTimeout)
			defer cancel()
			err := d.h.Connect(dctx, ai)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				log.Infow("join peer unreachable", "peer", ai.ID, "err", err)
				errs = append(errs, fmt.Errorf("%s: %w", ai.ID, err))
				return
			}
			reached++
		}()
	}
	wg.Wait()
	if err := d.dht.Bootstrap(ctx); err != nil {
		return fmt.Errorf("bootstrap dht: %w", err)
	}
	if len(errs) > 0 && reached == 0 {
		return fmt.Errorf("no join peer reachable: %w", errors.Join(errs...))
	}
	return nil
}

// readLoop moves accepted announcements of sub into the table. Our own
// come back here too and are no-ops, Publish having inserted them already.
func (d *Discovery) readLoop(sub *pubsub.Subscription) {
	for {
		msg, err := sub.Next(d.ctx)
		if err != nil {
			return // cancelled or subscription closed
		}
		a, ok := msg.ValidatorData.(*pb.Announce)
		if !ok {
			continue // cannot happen: our validator sets it on accept
		}
		d.table.offer(msg.GetFrom(), a, d.cfg.now(), d.origin(msg.GetFrom(), msg.ReceivedFrom))
	}
}

// origin describes how an announcement of author reached us through from.
func (d *Discovery) origin(author, from peer.ID) origin {
	o := origin{via: from, viaIP: d.peerIP(from)}
	if author == from {
		o.ip = o.viaIP
	} else {
		o.ip = d.peerIP(author)
	}
	o.proven = author == d.h.ID() || (d.h.Network().Connectedness(author) == network.Connected && d.admitted(author))
	if o.proven {
		o.rtt = d.h.Peerstore().LatencyEWMA(author)
	}
	return o
}

// peerIP is the IP address of our first connection to p that has one
// ("" when none): the relay's for a relayed connection.
func (d *Discovery) peerIP(p peer.ID) string {
	for _, c := range d.h.Network().ConnsToPeer(p) {
		if ip, err := manet.ToIP(c.RemoteMultiaddr()); err == nil {
			return ip.String()
		}
	}
	return ""
}

// connLoop follows connections: a peer that connects is proven (the
// handshake checked its key) and leaves quarantine; a peer with no
// connection left is dropped from the table at once, rather than when its
// TTL runs out.
func (d *Discovery) connLoop(sub event.Subscription) {
	defer sub.Close()
	for {
		select {
		case <-d.ctx.Done():
			return
		case e, ok := <-sub.Out():
			if !ok {
				return
			}
			ev := e.(event.EvtPeerConnectednessChanged)
			if ev.Peer == d.h.ID() {
				continue
			}
			if ev.Connectedness == network.Connected {
				if !d.admitted(ev.Peer) {
					// Proven once it shows its certificate.
					d.goRun(func() { d.proveMember(ev.Peer) })
					continue
				}
				if d.table.prove(ev.Peer, d.peerIP(ev.Peer)) {
					log.Debugw("peer left quarantine", "peer", ev.Peer)
				}
				continue
			}
			if ev.Connectedness != network.NotConnected {
				continue
			}
			// Events are delivered asynchronously: make sure no new
			// connection came up since.
			if d.h.Network().Connectedness(ev.Peer) == network.Connected {
				continue
			}
			if d.cfg.reconnecting != nil && d.cfg.reconnecting(ev.Peer) {
				d.goRun(func() { d.leaveUnlessBack(ev.Peer) })
				continue
			}
			d.leave(ev.Peer)
		}
	}
}

// reconnectWait bounds how long a peer being reconnected on purpose keeps
// its place in the table while not connected (a dial through a relay
// takes a few round trips; one that fails is bounded well within this).
const reconnectWait = 30 * time.Second

// leaveUnlessBack removes p once it is no longer being reconnected, if the
// reconnection did not bring it back.
func (d *Discovery) leaveUnlessBack(p peer.ID) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for deadline := time.Now().Add(reconnectWait); d.cfg.reconnecting(p) && time.Now().Before(deadline); {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
	}
	if d.h.Network().Connectedness(p) != network.Connected {
		d.leave(p)
	}
}

// leave removes a disconnected peer from the table.
func (d *Discovery) leave(p peer.ID) {
	if d.table.remove(p, ReasonDisconnected) {
		log.Debugw("peer left", "peer", p, "reason", ReasonDisconnected)
	}
}

// probeLoop dials quarantined peers, a few at a time, each with a growing
// back-off: a peer that answers leaves quarantine (connLoop sees the
// connection); fake or unreachable ones stay until they expire.
func (d *Discovery) probeLoop() {
	t := time.NewTicker(minProbeBackoff)
	defer t.Stop()
	sem := make(chan struct{}, probeConcurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-d.table.wake:
		case <-t.C:
		}
		for _, e := range d.table.dueProbes(probeConcurrency) {
			select {
			case sem <- struct{}{}:
			case <-d.ctx.Done():
				return
			}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				d.probe(e)
			}()
		}
	}
}

// probe dials a quarantined peer at the addresses it announced. A
// completed handshake proves that it holds its key and is reachable.
func (d *Discovery) probe(e Entry) {
	p := e.Peer
	if d.h.Network().Connectedness(p) == network.Connected {
		if d.admitted(p) {
			d.table.prove(p, d.peerIP(p))
		}
		return
	}
	var addrs []ma.Multiaddr
	for _, b := range e.Announce.GetAddrs() {
		if m, err := ma.NewMultiaddrBytes(b); err == nil {
			addrs = append(addrs, m)
		}
	}
	ctx, cancel := context.WithTimeout(d.ctx, min(d.cfg.dialTimeout, probeTimeout))
	defer cancel()
	if len(addrs) == 0 && len(d.h.Peerstore().Addrs(p)) == 0 {
		// An announcement from before addrs were announced: the DHT may
		// know where the peer is.
		ai, err := d.dht.FindPeer(ctx, p)
		if err != nil {
			log.Debugw("quarantined peer not found", "peer", p, "err", err)
			return
		}
		addrs = ai.Addrs
	}
	if err := d.h.Connect(ctx, peer.AddrInfo{ID: p, Addrs: addrs}); err != nil {
		log.Debugw("quarantined peer unreachable", "peer", p, "err", err)
		return
	}
	if d.admitted(p) {
		d.table.prove(p, d.peerIP(p))
	}
	// Otherwise connLoop proves it once it shows its certificate.
}

// admitted reports whether p may leave quarantine: always in an open swarm,
// once it has shown its certificate in a closed one.
func (d *Discovery) admitted(p peer.ID) bool {
	return d.cfg.members == nil || d.cfg.members.IsMember(p)
}

// memberWait bounds how long a new connection has to show a certificate
// before its peer stays in quarantine.
const memberWait = 15 * time.Second

// proveMember proves p once it is a member, if it becomes one in time.
func (d *Discovery) proveMember(p peer.ID) {
	ctx, cancel := context.WithTimeout(d.ctx, memberWait)
	defer cancel()
	if d.cfg.members.Await(ctx, p) && d.table.prove(p, d.peerIP(p)) {
		log.Debugw("member left quarantine", "peer", p)
	}
}

func (d *Discovery) sweepLoop() {
	t := time.NewTicker(d.cfg.sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
			if n := d.table.sweep(d.cfg.now()); n > 0 {
				log.Debugw("expired peers removed", "count", n)
			}
		}
	}
}

// Close stops discovery: mDNS, the topic, gossipsub, the DHT and the
// table's subscriptions. It does not close the host.
func (d *Discovery) Close() error {
	d.closeOnce.Do(func() {
		d.cancel()
		var errs []error
		if d.mdns != nil {
			errs = append(errs, d.mdns.Close())
		}
		if d.sub != nil {
			d.sub.Cancel()
		}
		if d.presenceSub != nil {
			d.presenceSub.Cancel()
		}
		if d.ps != nil {
			d.closeTopics()
			d.closeCatalog()
		}
		for _, t := range []*pubsub.Topic{d.topic, d.presence} {
			if t == nil {
				continue
			}
			if err := t.Close(); err != nil && !errors.Is(err, context.Canceled) {
				log.Debugw("close topic", "err", err)
			}
		}
		if d.dht != nil {
			errs = append(errs, d.dht.Close())
		}
		d.wg.Wait()
		d.table.close()
		d.closeErr = errors.Join(errs...)
	})
	return d.closeErr
}
