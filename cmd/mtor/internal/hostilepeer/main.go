// Command hostilepeer is a lying mtor worker for end-to-end tests: a
// separate process that joins a swarm of real `mtor node` processes,
// announces a model with perfect health and a 1 ms first token (every
// router's first choice until it learns better) and answers each query
// the hostile way its -behaviour names (discovery/hostiletest). It
// prints "peer: ID" once its first announcement is out and "query: N"
// for each query stream it is handed, and runs until SIGTERM or SIGINT.
// With -restarts, each announcement claims a restart (a new incarnation)
// that never happened; with -moves, new addresses. With -relay, it
// reserves on relays and announces only its circuits through them (a
// volunteer behind NAT); with -punch, it answers the first circuit dialed
// to it with hole-punch CONNECT messages naming the addresses it likes.
//
// It is test equipment: it listens on loopback, or in a test's network
// namespace, and is not part of the mtor binary.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/discovery/hostiletest"
	"github.com/mtor-swarm/mtor/protocol"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "hostilepeer:", err)
		os.Exit(1)
	}
}

func run() error {
	join := flag.String("join", "", "join token or /p2p/ multiaddr of a node of the swarm")
	model := flag.String("model", "demo", "model to announce")
	name := flag.String("behaviour", "stall", "how to answer queries (discovery/hostiletest)")
	listen := flag.String("listen", "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1", "comma-separated listen multiaddrs (loopback, or in a test's network namespace)")
	every := flag.Duration("every", time.Second, "time between announcements")
	restarts := flag.Bool("restarts", false, "announce a new incarnation each time: claim a restart it never made")
	moves := flag.Bool("moves", false, "announce a new loopback address each time: claim a move it never made")
	relays := flag.String("relay", "", "comma-separated /p2p/ multiaddrs of relays to reserve on; only the circuits through them are announced")
	punch := flag.String("punch", "", "semicolon-separated lists of comma-separated multiaddrs: one hole-punch CONNECT of each list on the first circuit dialed to it")
	identify := flag.String("identify", "", "comma-separated multiaddrs that identify lists as its own, instead of its listen addresses")
	flag.Parse()
	b, err := hostiletest.ParseBehaviour(*name)
	if err != nil {
		return err
	}
	swarm, infos, err := discovery.ParseJoin(*join)
	if err != nil {
		return err
	}
	if swarm == "" {
		swarm = protocol.DefaultSwarm
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	opts := []libp2p.Option{libp2p.ListenAddrStrings(strings.Split(*listen, ",")...)}
	if *identify != "" {
		var listed []ma.Multiaddr
		for _, s := range strings.Split(*identify, ",") {
			a, err := ma.NewMultiaddr(s)
			if err != nil {
				return fmt.Errorf("-identify: %w", err)
			}
			listed = append(listed, a)
		}
		opts = append(opts, libp2p.AddrsFactory(func([]ma.Multiaddr) []ma.Multiaddr { return listed }))
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		return err
	}
	defer h.Close()
	var queries atomic.Int64
	h.SetStreamHandler(protocol.QueryProtocol(swarm), hostiletest.Handler(ctx, h, b, func() {
		fmt.Printf("query: %d\n", queries.Add(1))
	}))
	ps, err := pubsub.NewGossipSub(ctx, h, pubsub.WithFloodPublish(true), pubsub.WithMessageSignaturePolicy(pubsub.StrictSign))
	if err != nil {
		return err
	}
	// A worker announces on the swarm's topic and on its model's; a
	// router listens on one or the other. Every node is on the presence
	// topic: a member missing there has a broken gossip link, which its
	// peers mend by reconnecting.
	var topics []*pubsub.Topic
	for _, name := range []string{protocol.AnnounceTopic(swarm), protocol.ModelTopic(swarm, *model), protocol.PresenceTopic(swarm)} {
		t, err := ps.Join(name)
		if err != nil {
			return err
		}
		sub, err := t.Subscribe()
		if err != nil {
			return err
		}
		defer sub.Cancel()
		topics = append(topics, t)
	}
	for _, ai := range infos {
		if err := h.Connect(ctx, ai); err != nil {
			return fmt.Errorf("join %s: %w", ai.ID, err)
		}
	}
	if *punch != "" {
		if err := punchOnCircuits(ctx, h, strings.Split(*punch, ";")); err != nil {
			return err
		}
	}
	addrs := h.Addrs
	if *relays != "" {
		circuits, err := reserve(ctx, h, *relays)
		if err != nil {
			return err
		}
		addrs = func() []ma.Multiaddr { return circuits }
	}
	seq := uint64(time.Now().UnixMilli()) * 1000
	announced := false
	tick := time.NewTicker(*every)
	defer tick.Stop()
	for {
		seq++
		a := hostiletest.Announce(*model, seq, addrs()...)
		if *restarts {
			a.Incarnation = seq // a new one each time, never 0
		}
		if *moves { // a closed loopback port, another each time
			a.Addrs = append(a.Addrs, ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", 40000+seq%1000)).Bytes())
		}
		data, err := proto.Marshal(a)
		if err != nil {
			return err
		}
		for _, t := range topics[:2] {
			if err := t.Publish(ctx, data); err != nil && ctx.Err() == nil {
				return err
			}
		}
		if !announced {
			announced = true
			fmt.Printf("peer: %s\n", h.ID())
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
