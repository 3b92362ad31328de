package discovery

import (
	"fmt"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"

	"github.com/mtor-swarm/mtor/protocol"
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
	now           func() time.Time

	onTopicJoin func(peer.ID)
	// memberProto is a protocol every node of the swarm serves; peers
	// that speak it have their gossip link watched (rejoin.go).
	memberProto libp2pproto.ID

	// for tests: observe gossipsub peer scores
	scoreInspect       pubsub.PeerScoreInspectFn
	scoreInspectPeriod time.Duration
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
		now:           time.Now,
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
