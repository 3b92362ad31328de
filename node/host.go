package node

import (
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/host/autorelay"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	noise "github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"go.uber.org/fx"
)

// Connection manager watermarks: enough for a large swarm's routing table
// and mesh, low enough for a volunteer's home router.
const (
	connLow  = 128
	connHigh = 384
)

// hostConfig is what newHost needs.
type hostConfig struct {
	key      crypto.PrivKey
	listen   []string
	query    libp2pproto.ID
	relay    bool
	relays   autorelay.PeerSource // where NAT'd nodes find relays
	relayACL relay.ACLFilter      // who our relay serves
}

// queryLimits bounds the query protocol in the resource manager: streams in
// and out overall and per peer, and memory for request frames.
func queryLimits(cfg *rcmgr.ScalingLimitConfig, proto libp2pproto.ID) {
	cfg.AddProtocolLimit(proto,
		rcmgr.BaseLimit{Streams: 2048, StreamsInbound: 1024, StreamsOutbound: 1024, Memory: 256 << 20},
		rcmgr.BaseLimitIncrease{Streams: 1024, StreamsInbound: 512, StreamsOutbound: 512, Memory: 128 << 20},
	)
	cfg.AddProtocolPeerLimit(proto,
		rcmgr.BaseLimit{Streams: 256, StreamsInbound: 128, StreamsOutbound: 256, Memory: 64 << 20},
		rcmgr.BaseLimitIncrease{Streams: 64, StreamsInbound: 32, StreamsOutbound: 64, Memory: 16 << 20},
	)
}

func newHost(hc hostConfig) (host.Host, error) {
	limits := rcmgr.DefaultLimits
	// DefaultLimits holds maps; give this host its own so nothing is shared.
	limits.ServiceLimits, limits.ServicePeerLimits = nil, nil
	limits.ProtocolLimits, limits.ProtocolPeerLimits = nil, nil
	libp2p.SetDefaultServiceLimits(&limits)
	queryLimits(&limits, hc.query)
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.AutoScale()))
	if err != nil {
		return nil, fmt.Errorf("resource manager: %w", err)
	}
	cm, err := connmgr.NewConnManager(connLow, connHigh, connmgr.WithGracePeriod(time.Minute))
	if err != nil {
		return nil, fmt.Errorf("connection manager: %w", err)
	}
	opts := []libp2p.Option{
		libp2p.Identity(hc.key),
		libp2p.ListenAddrStrings(hc.listen...),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Transport(quic.NewTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.Security(libp2ptls.ID, libp2ptls.New),
		libp2p.ResourceManager(rm),
		libp2p.ConnectionManager(cm),
		// NAT'd volunteers: reachability detection, relay client and
		// hole punching (DCUtR). UPnP port mapping stays off: it sends
		// discovery traffic to the LAN, which an operator must opt into.
		libp2p.EnableNATService(),
		libp2p.EnableRelay(),
		libp2p.EnableHolePunching(),
		// A failed start (an address not on this machine) comes back as
		// an error; fx's own multi-line report of it would only repeat it.
		libp2p.WithFxOption(fx.NopLogger),
	}
	if hc.relays != nil {
		opts = append(opts, libp2p.EnableAutoRelayWithPeerSource(hc.relays))
	}
	if hc.relay {
		// Default relay limits cut a connection after 2 min or 128 KiB,
		// which kills a token stream; our relays carry whole answers.
		// --relay declares a public address: libp2p starts the relay
		// service only on hosts it believes publicly reachable.
		opts = append(opts, libp2p.EnableRelayService(relay.WithInfiniteLimits(), relay.WithACL(hc.relayACL)),
			libp2p.ForceReachabilityPublic())
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("start libp2p host: %w", err)
	}
	return h, nil
}
