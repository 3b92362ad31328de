package discovery

import (
	"context"
	"fmt"
	"net"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Defaults. The announce TTL is three heartbeats of 10 s, as ipfs-cluster
// does it: one lost announcement does not drop a peer, three do.
const (
	DefaultAnnounceTTL   = 30 * time.Second
	DefaultPingInterval  = 15 * time.Second
	DefaultPingTimeout   = 5 * time.Second
	DefaultSweepInterval = time.Second
	DefaultDialTimeout   = 10 * time.Second
	DefaultMaxEntries    = 10000
	// Quarantine limits: announcements of peers known only from gossip
	// wait here until a dial proves them (see PeerTable).
	DefaultMaxPending      = 1024
	DefaultMaxPerForwarder = 256 // quarantined peers delivered by one peer, or by peers of one IP
	DefaultMaxPerIP        = 64  // admitted peers reached at one IP, loopback excepted
	// An author may announce once per DefaultAnnounceEvery on average,
	// with bursts of DefaultAnnounceBurst: ten times what the announcer
	// sends at its fastest (a 100 ms heartbeat plus changes).
	DefaultAnnounceEvery = 50 * time.Millisecond
	DefaultAnnounceBurst = 40
	// DefaultIPColocationThreshold is how many gossip peers one IP may
	// have before gossipsub's P6 penalty starts (quadratic beyond): as
	// many as the table admits, so that volunteers behind one campus or
	// carrier NAT are not graylisted (at 16, 25 of them were).
	DefaultIPColocationThreshold = DefaultMaxPerIP
	// DefaultMaxPerModel is the per-model bound on workers kept by a node
	// without the swarm view (see WithSwarmView).
	DefaultMaxPerModel = 16
	// maxWatched bounds the model topics a node subscribes to; beyond
	// it, the one used least recently is left.
	maxWatched = 64
	// providerConnectWait bounds the DHT look-up and dials with which a
	// node starts watching a model.
	providerConnectWait = 30 * time.Second
	// redialEvery spaces the provider dials of one watched model.
	redialEvery = 10 * time.Second
	// learnWindow is how long after a node without the swarm view starts
	// watching a model an empty provider look-up is tried again: the
	// model's workers may have just started (their records not yet put)
	// and their announcements are on their way down the model's topic.
	learnWindow = 5 * time.Second
	// learnWindowListed is learnWindow for a model the swarm's catalogue
	// lists: its workers exist, and the first of them to put its record
	// may be joining over a slow or lossy link (a lost SYN costs 1 s, two
	// cost 3 s).
	learnWindowListed = 15 * time.Second
	// routingWait bounds the wait of a DHT operation for the routing
	// table's first peer while connections are being identified.
	routingWait = 5 * time.Second
	// unusableFor is how long a worker the router found unusable
	// (SeekWorkers) is the first to be replaced: long enough for a
	// provider look-up to bring others, short enough for a briefly busy
	// worker to count again.
	unusableFor = 30 * time.Second
	// Relay dials (WatchRelays) are spaced 1 s at first (the DHT may be
	// empty at start), doubling to 2 min, so that nodes wanting more
	// relays than the swarm has do not query the DHT without end.
	relayRedialMin = time.Second
	relayRedialMax = 2 * time.Minute
	// maxRelayDials bounds the relays a node without the swarm view
	// dials to learn of them: enough for the most reservations a node
	// holds (8).
	maxRelayDials    = 8
	probeConcurrency = 4
	probeTimeout     = 5 * time.Second
	// DefaultMaxPubSubMessage bounds a gossipsub RPC. An announcement is at
	// most protocol.MaxAnnounce (16 KiB); an RPC may batch a few of them plus
	// control messages, so a quarter of the library's 1 MiB default is ample.
	DefaultMaxPubSubMessage = 256 << 10

	maxPingConcurrency = 8
	maxDialConcurrency = 8
	mdnsDialWorkers    = 4
	mdnsQueue          = 64
)

// Option configures a Discovery.
type Option func(*config) error

type config struct {
	swarm         string
	bootstrap     []peer.AddrInfo
	mdns          bool
	announceTTL   time.Duration
	dhtMode       dht.ModeOpt
	pingInterval  time.Duration
	pingTimeout   time.Duration
	sweepInterval time.Duration
	dialTimeout   time.Duration
	maxEntries    int
	limits        tableLimits
	announceEvery time.Duration
	announceBurst int
	ipColocation  int
	ipWhitelist   []*net.IPNet
	now           func() time.Time
	// swarmView: subscribe to the swarm's announce topic, which carries
	// every node's announcement (see WithSwarmView).
	swarmView bool
	watch     []string // models watched from the start
	// redialEvery spaces the provider look-ups of one watched model
	// (tests shorten it).
	redialEvery time.Duration

	onTopicJoin func(peer.ID)
	// suspect probes a connection whose peer's ping failed (see
	// WithSuspect).
	suspect func(network.Conn)
	// reconnecting reports a peer whose connections are being replaced on
	// purpose (WithReconnecting).
	reconnecting func(peer.ID) bool
	// busy reports a peer this node has queries in flight with, either
	// way (WithBusy); busyMax bounds a repair's wait for them
	// (rejoinBusyMax).
	busy    func(peer.ID) bool
	busyMax time.Duration
	// memberProto is a protocol every node of the swarm serves; peers
	// that speak it have their gossip link watched (rejoin.go).
	memberProto libp2pproto.ID

	// members, when set, closes the swarm to its members (see Members).
	members Members

	// for tests: replaces the gossip-link repair of a peer (rejoin)
	repair func(peer.ID)

	// for tests: observe gossipsub peer scores
	scoreInspect       pubsub.PeerScoreInspectFn
	scoreInspectPeriod time.Duration
	outboundQueue      int // gossipsub's per-peer outbound queue; 0: its default
	validateQueue      int // messages waiting for validation; 0: validateQueue

	// catalogEvery is the model catalogue's period; 0: off (catalog.go).
	catalogEvery time.Duration
	// catalogRead: a node without the swarm view reads the catalogue.
	catalogRead bool
}

func defaults() config {
	return config{
		swarm:         protocol.DefaultSwarm,
		announceTTL:   DefaultAnnounceTTL,
		dhtMode:       dht.ModeAutoServer,
		pingInterval:  DefaultPingInterval,
		pingTimeout:   DefaultPingTimeout,
		sweepInterval: DefaultSweepInterval,
		dialTimeout:   DefaultDialTimeout,
		maxEntries:    DefaultMaxEntries,
		limits:        defaultLimits(),
		announceEvery: DefaultAnnounceEvery,
		announceBurst: DefaultAnnounceBurst,
		ipColocation:  DefaultIPColocationThreshold,
		now:           time.Now,
		swarmView:     true,
		redialEvery:   redialEvery,
		catalogEvery:  DefaultCatalogEvery,
		catalogRead:   true,
		busyMax:       rejoinBusyMax,
	}
}

// WithMemberProtocol names a stream protocol every node of the swarm
// serves (the query protocol). A connected peer that speaks it but has not
// joined our announce topic a few seconds after connecting has a broken
// gossip link, and is reconnected (see rejoin.go). Unset: no such repair.
func WithMemberProtocol(id libp2pproto.ID) Option {
	return func(c *config) error { c.memberProto = id; return nil }
}

// WithSwarm names the swarm: it selects the announce topic, the DHT prefix
// and the mDNS service. Default protocol.DefaultSwarm.
func WithSwarm(name string) Option {
	return func(c *config) error {
		if name == "" {
			name = protocol.DefaultSwarm
		}
		if err := protocol.ValidateSwarm(name); err != nil {
			return err
		}
		c.swarm = name
		return nil
	}
}

// WithBootstrap sets the peers to join through. They are dialled by
// Bootstrap, seed the DHT and are protected in the connection manager.
func WithBootstrap(peers []peer.AddrInfo) Option {
	return func(c *config) error {
		c.bootstrap = append([]peer.AddrInfo(nil), peers...)
		return nil
	}
}

// WithMDNS turns LAN discovery by multicast DNS on or off. Default off, so
// that tests and embedded uses never multicast by surprise; the CLI turns
// it on unless --no-mdns.
func WithMDNS(enabled bool) Option {
	return func(c *config) error {
		c.mdns = enabled
		return nil
	}
}

// WithAnnounceTTL sets the ttl that Publish stamps on announcements: how long
// receivers keep this node in their table without a newer announcement.
// It should be 2-3 times the announce heartbeat.
func WithAnnounceTTL(d time.Duration) Option {
	return func(c *config) error {
		if d < protocol.MinAnnounceTTL || d > protocol.MaxAnnounceTTL {
			return fmt.Errorf("announce ttl %s out of range [%s, %s]", d, protocol.MinAnnounceTTL, protocol.MaxAnnounceTTL)
		}
		c.announceTTL = d
		return nil
	}
}

// WithDHTMode sets the Kademlia mode. Default dht.ModeAutoServer (a server
// unless AutoNAT finds the node private); bootstrap nodes want ModeServer.
func WithDHTMode(m dht.ModeOpt) Option {
	return func(c *config) error {
		c.dhtMode = m
		return nil
	}
}

// WithPingInterval sets how often connected peers of the table are pinged
// to measure RTT. Zero or less turns RTT measurement off.
func WithPingInterval(d time.Duration) Option {
	return func(c *config) error {
		c.pingInterval = d
		return nil
	}
}

// WithPingTimeout bounds one RTT measurement. Default 5 s.
func WithPingTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("ping timeout must be positive, got %s", d)
		}
		c.pingTimeout = d
		return nil
	}
}

// WithSweepInterval sets how often expired entries are removed from the
// table. Default 1 s; it bounds how late a Leave("expired") comes.
func WithSweepInterval(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("sweep interval must be positive, got %s", d)
		}
		c.sweepInterval = d
		return nil
	}
}

// WithDialTimeout bounds one dial to a join or mDNS peer. Default 10 s.
func WithDialTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("dial timeout must be positive, got %s", d)
		}
		c.dialTimeout = d
		return nil
	}
}

// WithMaxEntries caps the peer table. Announcements from new peers beyond
// the cap are dropped (and logged). Default 10000.
func WithMaxEntries(n int) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("max entries must be at least 1, got %d", n)
		}
		c.maxEntries = n
		return nil
	}
}

// WithOnTopicPeerJoin calls f (which must not block) when a peer joins the
// announce topic, so the node can announce at once: a newcomer then learns
// of existing workers without waiting for their next heartbeat.
func WithOnTopicPeerJoin(f func(peer.ID)) Option {
	return func(c *config) error {
		c.onTopicJoin = f
		return nil
	}
}

// WithSuspect calls f (which must not block) with each connection to a
// table peer whose ping failed, for the node to probe and close if its
// peer is gone (liveness.Checker.Suspect). A peer that vanished without a
// reset, as a killed one on QUIC does, otherwise stays connected, and in
// the table, until the connection's idle timeout (30 s on QUIC). When most
// pings of a round of 4 or more fail, none is handed over: the fault is
// then likely this node's own.
func WithSuspect(f func(network.Conn)) Option {
	return func(c *config) error {
		c.suspect = f
		return nil
	}
}

// WithReconnecting names, through f (which must not block), the peers
// whose connections this node is replacing on purpose (node/repunch
// closes a peer's relayed connections to dial it again): their
// disconnection is not their departure. Such a peer leaves the table only
// if it is still not connected once f no longer names it (at most
// reconnectWait after the disconnection).
func WithReconnecting(f func(peer.ID) bool) Option {
	return func(c *config) error {
		c.reconnecting = f
		return nil
	}
}

// WithBusy names, through f (which must not block), the peers this node
// has queries in flight with, either way. A gossip-link repair
// (rejoin.go), which closes all of a peer's connections and the query
// streams on them, waits while f names the peer, 30 s at most.
func WithBusy(f func(peer.ID) bool) Option {
	return func(c *config) error {
		c.busy = f
		return nil
	}
}

// WithQuarantineLimits bounds the peers known only from gossip: pending in
// all, perForwarder per peer that delivered them (and per IP of such
// peers); perIP bounds admitted peers reached at one IP address (not at
// loopback: see perIPBounded). Zero keeps a default.
func WithQuarantineLimits(pending, perForwarder, perIP int) Option {
	return func(c *config) error {
		if pending < 0 || perForwarder < 0 || perIP < 0 {
			return fmt.Errorf("quarantine limits must not be negative: %d, %d, %d", pending, perForwarder, perIP)
		}
		if pending > 0 {
			c.limits.pending = pending
		}
		if perForwarder > 0 {
			c.limits.perForwarder = perForwarder
		}
		if perIP > 0 {
			c.limits.perIP = perIP
		}
		return nil
	}
}

// WithAnnounceRate sets how often one author may announce: on average
// once per every, with bursts of burst. An author that publishes faster
// straight to us is rejected (penalised by peer scoring); forwarded
// excess is ignored, so honest forwarders are not blamed.
func WithAnnounceRate(every time.Duration, burst int) Option {
	return func(c *config) error {
		if every <= 0 || burst < 1 {
			return fmt.Errorf("announce rate: every %s, burst %d: both must be positive", every, burst)
		}
		c.announceEvery, c.announceBurst = every, burst
		return nil
	}
}

// WithIPColocation sets gossipsub's IP colocation penalty: beyond
// threshold gossip peers at one IP, each of them scores −(surplus²).
// Addresses in whitelist are exempt (say, a lab's LAN); gossipsub itself
// leaves loopback out. Zero turns the penalty off.
func WithIPColocation(threshold int, whitelist ...*net.IPNet) Option {
	return func(c *config) error {
		if threshold < 0 {
			return fmt.Errorf("ip colocation threshold %d must not be negative", threshold)
		}
		c.ipColocation, c.ipWhitelist = threshold, whitelist
		return nil
	}
}

// WithScoreInspect has f called every period with the gossipsub score of
// every peer, as the score inspector sees it (tests, diagnostics).
func WithScoreInspect(f func(map[peer.ID]float64), period time.Duration) Option {
	return func(c *config) error {
		if period <= 0 {
			return fmt.Errorf("score inspect period must be positive, got %s", period)
		}
		c.scoreInspect, c.scoreInspectPeriod = pubsub.PeerScoreInspectFn(f), period
		return nil
	}
}

// Members says who belongs to a closed swarm (node/membership implements
// it). A peer becomes a member some time after it connects, once it has
// presented its certificate.
type Members interface {
	// IsMember reports whether p is known to be a member now.
	IsMember(p peer.ID) bool
	// Await waits until p is a member or ctx ends.
	Await(ctx context.Context, p peer.ID) bool
	// Revoked reports whether p is known to be revoked.
	Revoked(p peer.ID) bool
	// HasRole reports whether member p's certificate grants role.
	HasRole(p peer.ID, role string) bool
}

// RoleWorker is the role an announcement with models needs in a closed
// swarm; every role an announcement lists must be granted too.
const RoleWorker = "worker"

// rolesGranted reports whether member p may announce a: each role it
// lists, and the worker role if it announces models.
func rolesGranted(m Members, p peer.ID, a *pb.Announce) bool {
	if len(a.GetModels()) > 0 && !m.HasRole(p, RoleWorker) {
		return false
	}
	for _, r := range a.GetRoles() {
		if !m.HasRole(p, r) {
			return false
		}
	}
	return true
}

// WithMembers closes the swarm: gossip is exchanged with members only,
// announcements delivered by non-members or authored by revoked peers are
// ignored, a peer leaves quarantine only once it is a member, an
// announcement beyond its author's roles is ignored (see rolesGranted),
// and DHT providers that are not members are left out. Unset: an open
// swarm.
func WithMembers(m Members) Option {
	return func(c *config) error { c.members = m; return nil }
}

// WithSwarmView says whether this node follows the whole swarm. On (the
// default), it subscribes to the swarm's announce topic, on which every
// node announces, and holds every worker: what a bridge's model list, the
// web page's swarm view and `mtor peers` show, at a cost per node that
// grows with the swarm. Off, it subscribes only to the topics of the
// models it routes to (Watch: on the first look-up of a model's providers,
// or WithWatch), and keeps at most WithMaxPerModel workers of each
// (DefaultMaxPerModel unless set), finding others through the DHT, and,
// once it asks for relays (WatchRelays), to the relay topic: a cost per
// node that grows with what it needs, not with the swarm.
func WithSwarmView(on bool) Option {
	return func(c *config) error {
		c.swarmView = on
		if !on && c.limits.perModel == 0 {
			c.limits.perModel = DefaultMaxPerModel
		}
		return nil
	}
}

// WithMaxPerModel bounds the workers of one model the table keeps (k ≥ 1;
// zero lifts the bound). An author is taken while one of its models has
// room, or in place of a kept worker of one of them that it is clearly
// better than (the best are kept, not the first); others are neither
// probed nor forwarded.
func WithMaxPerModel(k int) Option {
	return func(c *config) error {
		if k < 0 {
			return fmt.Errorf("max workers per model must not be negative, got %d", k)
		}
		c.limits.perModel = k
		return nil
	}
}

// WithWatch watches models from the start (see WithSwarmView): a bridge
// that knows which models its users ask for need not learn them on the
// first request. Without the swarm view only; at most 64.
func WithWatch(models ...string) Option {
	return func(c *config) error {
		for _, m := range models {
			if err := protocol.ValidateModelName(m); err != nil {
				return fmt.Errorf("watch: %w", err)
			}
		}
		if len(models) > maxWatched {
			return fmt.Errorf("watch: %d models, limit %d", len(models), maxWatched)
		}
		c.watch = append([]string(nil), models...)
		return nil
	}
}

// WithGossipQueues sizes gossipsub's outbound queue per peer (its
// default: 32 messages) and the queue of received messages waiting for
// validation (256). Zero keeps a default.
func WithGossipQueues(outbound, validate int) Option {
	return func(c *config) error {
		if outbound < 0 || validate < 0 {
			return fmt.Errorf("gossip queues %d, %d must not be negative", outbound, validate)
		}
		c.outboundQueue, c.validateQueue = outbound, validate
		return nil
	}
}
