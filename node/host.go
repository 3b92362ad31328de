package node

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/connmgr"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	basicconnmgr "github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	noise "github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-libp2p/x/rate"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/coalesce"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/node/tcpdial"
	"github.com/mtor-swarm/mtor/protocol"
	"go.uber.org/fx"
)

// Connection manager watermarks: enough for a large swarm's routing table
// and mesh, low enough for a volunteer's home router. A node without the
// swarm view that relays nothing (a pure worker) needs few: the peers
// routing to it (protected while a query is open, tagged while they follow
// its models), its relays (protected), its bootstrap (protected), and a
// DHT routing table that works with transient connections. Each
// connection costs it about 100 KiB (goroutine stacks, mostly), so 384 of
// them would more than double its idle memory in a large swarm.
const (
	connLow      = 128
	connHigh     = 384
	connLowLean  = 32
	connHighLean = 96
	// connGracePeriod spares a new connection from the trim: it may be
	// one a query or a look-up is about to use.
	connGracePeriod = time.Minute
)

// Limits sized for volunteers: dozens of them may share one public IPv4
// address behind a carrier-grade NAT, or one university's /48. libp2p's
// defaults (8 connections and 8 relay reservations per IPv4 address, a
// new connection every 5 s per address after a burst of 16) let only
// eight of them in.
const (
	// ConnsPerIPv4 bounds the connections from one IPv4 address.
	ConnsPerIPv4 = 256
	// ConnsPerIPv6Net bounds the connections from one IPv6 /56 (×4 per /48).
	ConnsPerIPv6Net = 256
	// RelayReservationsPerIP bounds the peers of one IP address a relay
	// holds reservations for.
	RelayReservationsPerIP = 128
	// RelayReservations bounds a relay's reservations in all.
	RelayReservations = 1024
	// RelayCircuitsPerPeer bounds the relayed connections of one peer.
	RelayCircuitsPerPeer = 64
	// connRatePerIP is the sustained rate of new connections per address,
	// after a burst of connBurstPerIP.
	connRatePerIP  = 2.0
	connBurstPerIP = 128
)

// hostConfig is what newHost needs.
type hostConfig struct {
	key          crypto.PrivKey
	listen       []string
	query        libp2pproto.ID
	width        int // the worker's admission: queries running plus queued
	relay        bool
	reachability Reachability // forced, or ReachabilityUnknown for AutoNAT
	relayACL     relay.ACLFilter
	addrs        func([]ma.Multiaddr) []ma.Multiaddr // announced and relayed addresses; nil for none
	gater        connmgr.ConnectionGater             // a closed swarm's; nil for none
	punches      holepunch.EventTracer               // told of hole punches; nil for none
	lean         bool                                // the lean watermarks: no swarm view, no relay service
	grace        time.Duration                       // the trim spares younger connections; 0: connGracePeriod
	filter       *punchFilter                        // the punches' filter and gate; nil: a new one
}

// Query streams of one peer. A bridge carrying many users is one peer
// with many queries open at once at each worker, so a worker lets one
// peer hold as many query streams as it admits queries (running and
// queued: beyond that it answers BUSY anyway) plus some being refused or
// closing; a hostile peer opening streams without bound is reset past
// that. Each stream holds workerStreamMemory of the worker's memory
// budget (worker.HandleStream), and the request frames read on it more.
const (
	minQueryStreamsPerPeer = 256
	queryStreamSlack       = 64
	// QueryStreamsOutPerPeer bounds this node's own query streams to one
	// worker: its bridge's admission bounds its queries, this only a
	// runaway.
	QueryStreamsOutPerPeer = 4096
	workerStreamMemory     = 64 << 10
	// queryFrameMemory is room for request frames (media uploads) on top
	// of the streams' own share, at their reservations' priority.
	queryFrameMemory = 64 << 20
)

// QueryStreamsPerPeer is how many query streams one peer may hold open at
// a worker that admits width queries (running plus queued).
func QueryStreamsPerPeer(width int) int {
	return max(minQueryStreamsPerPeer, width+queryStreamSlack)
}

// queryLimits bounds the query protocol in the resource manager: streams in
// and out overall and per peer, and memory for request frames; width is
// the worker's admission (queries running plus queued).
func queryLimits(cfg *rcmgr.ScalingLimitConfig, proto libp2pproto.ID, width int) {
	in, out := QueryStreamsPerPeer(width), QueryStreamsOutPerPeer
	// Twice the streams' share: request frames reserve at medium
	// priority, which libp2p grants up to 60 % of a scope's limit.
	mem := int64(queryFrameMemory + 2*in*workerStreamMemory)
	cfg.AddProtocolLimit(proto,
		rcmgr.BaseLimit{Streams: 2048 + in + out, StreamsInbound: 1024 + in, StreamsOutbound: 1024 + out, Memory: 256<<20 + mem},
		rcmgr.BaseLimitIncrease{Streams: 1024, StreamsInbound: 512, StreamsOutbound: 512, Memory: 128 << 20},
	)
	cfg.AddProtocolPeerLimit(proto,
		rcmgr.BaseLimit{Streams: in + out, StreamsInbound: in, StreamsOutbound: out, Memory: mem},
		rcmgr.BaseLimitIncrease{Memory: 16 << 20},
	)
	// libp2p's limits of one peer over all protocols must leave room
	// for the query protocol's, on top of what the others use.
	pl := &cfg.PeerBaseLimit
	pl.StreamsInbound += in
	pl.StreamsOutbound += out
	pl.Streams += in + out
	pl.Memory += mem
}

// memberLimits bounds the membership handshake of closed swarms: one
// stream each way per connection is all it needs, a few more cover
// reconnections; its messages are at most membership.MaxMessage.
func memberLimits(cfg *rcmgr.ScalingLimitConfig) {
	cfg.AddProtocolLimit(membership.ProtocolID,
		rcmgr.BaseLimit{Streams: 1024, StreamsInbound: 512, StreamsOutbound: 512, Memory: 32 << 20},
		rcmgr.BaseLimitIncrease{Streams: 512, StreamsInbound: 256, StreamsOutbound: 256, Memory: 16 << 20},
	)
	cfg.AddProtocolPeerLimit(membership.ProtocolID,
		rcmgr.BaseLimit{Streams: 8, StreamsInbound: 4, StreamsOutbound: 4, Memory: 1 << 20},
		rcmgr.BaseLimitIncrease{},
	)
}

// relayLimits lets a relay node carry many whole answers at once: the
// relay service's streams (a reservation and two per relayed connection).
func relayLimits(cfg *rcmgr.ScalingLimitConfig) {
	cfg.AddServiceLimit(relay.ServiceName,
		rcmgr.BaseLimit{StreamsInbound: 2048, StreamsOutbound: 2048, Streams: 4096, Memory: 128 << 20},
		rcmgr.BaseLimitIncrease{StreamsInbound: 1024, StreamsOutbound: 1024, Streams: 2048, Memory: 64 << 20},
	)
	cfg.AddServicePeerLimit(relay.ServiceName,
		rcmgr.BaseLimit{StreamsInbound: 256, StreamsOutbound: 256, Streams: 256, Memory: 8 << 20},
		rcmgr.BaseLimitIncrease{},
	)
}

// resourceManager is the node's resource manager: libp2p's scaled
// defaults with the query protocol's limits and the per-address limits
// above.
func resourceManager(proto libp2pproto.ID, width int, relayService bool) (network.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	// DefaultLimits holds maps; give this host its own so nothing is shared.
	limits.ServiceLimits, limits.ServicePeerLimits = nil, nil
	limits.ProtocolLimits, limits.ProtocolPeerLimits = nil, nil
	libp2p.SetDefaultServiceLimits(&limits)
	queryLimits(&limits, proto, width)
	memberLimits(&limits)
	if relayService {
		relayLimits(&limits)
	}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.AutoScale()),
		rcmgr.WithLimitPerSubnet(
			[]rcmgr.ConnLimitPerSubnet{{PrefixLength: 32, ConnCount: ConnsPerIPv4}},
			[]rcmgr.ConnLimitPerSubnet{{PrefixLength: 56, ConnCount: ConnsPerIPv6Net}, {PrefixLength: 48, ConnCount: 4 * ConnsPerIPv6Net}}),
		rcmgr.WithConnRateLimiters(connRateLimiter()),
		// Its Prometheus metrics go to the default registry, which mtor
		// never serves, and cost a traced event (a formatted timestamp,
		// allocations) per stream opened and closed.
		rcmgr.WithMetricsDisabled())
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	return rm, nil
}

// connRateLimiter is libp2p's per-address rate limit of new connections,
// raised for many peers behind one address; loopback stays unlimited.
func connRateLimiter() *rate.Limiter {
	per := rate.Limit{RPS: connRatePerIP, Burst: connBurstPerIP}
	return &rate.Limiter{
		NetworkPrefixLimits: rcmgrLoopback(),
		SubnetRateLimiter: rate.SubnetLimiter{
			IPv4SubnetLimits: []rate.SubnetLimit{{PrefixLength: 32, Limit: per}},
			IPv6SubnetLimits: []rate.SubnetLimit{{PrefixLength: 56, Limit: per}},
			GracePeriod:      time.Minute,
		},
	}
}

// rcmgrLoopback exempts loopback from the rate limit, as libp2p does.
func rcmgrLoopback() []rate.PrefixLimit {
	return []rate.PrefixLimit{
		{Prefix: netip.MustParsePrefix("127.0.0.0/8")},
		{Prefix: netip.MustParsePrefix("::1/128")},
	}
}

// relayResources are the relay service's limits: no time or data limit on
// a relayed connection (a token stream outlives libp2p's 2 min / 128 KiB),
// and room for many volunteers, also behind one address.
func relayResources() relay.Resources {
	rc := relay.DefaultResources()
	rc.Limit = nil
	rc.MaxReservations = RelayReservations
	rc.MaxReservationsPerIP = RelayReservationsPerIP
	rc.MaxReservationsPerASN = RelayReservations
	rc.MaxCircuits = RelayCircuitsPerPeer
	return rc
}

// expendable are the protocols whose streams a redundant connection may
// take down with it (node/dupconn): their owners open a new stream on the
// connection left and lose nothing. Gossipsub is not one of them.
func expendable(swarm string) []libp2pproto.ID {
	return []libp2pproto.ID{identify.ID, identify.IDPush, ping.ID, protocol.DHTPrefix(swarm) + "/kad/1.0.0"}
}

// reconnectSafe reports whether a stream of protocol id may break when
// every connection to its peer closes and one is dialed again
// (node/repunch): the expendable ones, and gossipsub's, whose router
// greets a peer that reconnects as a new one and sends its subscriptions
// again. A query, a receipt or a hole punch under way is not.
func reconnectSafe(swarm string) func(libp2pproto.ID) bool {
	safe := append(expendable(swarm), pubsub.GossipSubDefaultProtocols...)
	return func(id libp2pproto.ID) bool { return slices.Contains(safe, id) }
}

func newHost(hc hostConfig) (host.Host, error) {
	rm, err := resourceManager(hc.query, hc.width, hc.relay)
	if err != nil {
		return nil, err
	}
	low, high := connLow, connHigh
	if hc.lean {
		low, high = connLowLean, connHighLean
	}
	grace := hc.grace
	if grace <= 0 {
		grace = connGracePeriod
	}
	cm, err := basicconnmgr.NewConnManager(low, high, basicconnmgr.WithGracePeriod(grace))
	if err != nil {
		return nil, fmt.Errorf("connection manager: %w", err)
	}
	// Both ends of a punch dial one transport (punchfilter.go).
	punchFilter := hc.filter
	if punchFilter == nil {
		punchFilter = newPunchFilter()
	}
	// TCP dials leave from the listen port, and a punch's refused dial is
	// tried again from it rather than from a random port (node/tcpdial).
	tcpDialer := tcpdial.New()
	punchOpts := []holepunch.Option{holepunch.WithAddrFilter(punchFilter)}
	if hc.punches != nil {
		punchOpts = append(punchOpts, holepunch.WithTracer(hc.punches))
	}
	opts := []libp2p.Option{
		libp2p.Identity(hc.key),
		libp2p.ListenAddrStrings(hc.listen...),
		libp2p.Transport(tcp.NewTCPTransport, tcp.WithDialerForAddr(tcpDialer.ForAddr)),
		libp2p.Transport(quic.NewTransport),
		// yamux (TCP and relayed connections) writes each frame by
		// itself; frames that queue while a write is under way go
		// together (node/coalesce). QUIC packs its own.
		libp2p.Muxer(yamux.ID, coalesce.Muxer(yamux.DefaultTransport)),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(libp2ptls.ID, libp2ptls.New),
		libp2p.ResourceManager(rm),
		libp2p.DisableMetrics(), // see resourceManager: never served
		libp2p.ConnectionManager(cm),
		// NAT'd volunteers: reachability detection (AutoNAT v1 and v2,
		// client and service), the relay client and hole punching
		// (DCUtR). Relay reservations are ours (relayKeeper), not
		// libp2p's autorelay: see relay.go. UPnP port mapping stays off:
		// it sends discovery traffic to the LAN, which an operator must
		// opt into.
		libp2p.EnableNATService(),
		libp2p.EnableAutoNATv2(),
		libp2p.EnableRelay(),
		libp2p.EnableHolePunching(punchOpts...),
		// A failed start (an address not on this machine) comes back as
		// an error; fx's own multi-line report of it would only repeat it.
		libp2p.WithFxOption(fx.NopLogger),
	}
	if hc.addrs != nil {
		opts = append(opts, libp2p.AddrsFactory(hc.addrs))
	}
	opts = append(opts, libp2p.ConnectionGater(punchGate{next: hc.gater, f: punchFilter}))
	reach := hc.reachability
	if hc.relay {
		// libp2p starts the relay service only on hosts it believes
		// publicly reachable: --relay declares a public address.
		reach = ReachabilityPublic
		opts = append(opts, libp2p.EnableRelayService(relay.WithResources(relayResources()), relay.WithACL(hc.relayACL)))
	}
	switch reach {
	case ReachabilityPublic:
		opts = append(opts, libp2p.ForceReachabilityPublic())
	case ReachabilityPrivate:
		opts = append(opts, libp2p.ForceReachabilityPrivate())
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("start libp2p host: %w", err)
	}
	punchFilter.setNetwork(h.Network())
	tcpDialer.Attach(h.Network())
	return h, nil
}
