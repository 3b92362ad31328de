// Package hostiletest runs misbehaving mtor peers for tests: a real libp2p
// host on loopback that speaks the announce topic and the query protocol
// the way an attacker would. Everything it does is bounded by the test's
// context and ends when the test ends.
package hostiletest

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	pubsubpb "github.com/libp2p/go-libp2p-pubsub/pb"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Peer is one hostile host. It runs plain gossipsub with no validator and
// no scoring, so nothing stops what it sends before the victim.
type Peer struct {
	t     testing.TB
	H     host.Host
	PS    *pubsub.PubSub
	Topic *pubsub.Topic
	swarm string
	seq   uint64
	mu    sync.Mutex
	ctx   context.Context // ends with the test
	// Queries counts the query streams Serve was handed.
	Queries atomic.Int64
}

// New starts a hostile peer of swarm on loopback TCP, on the swarm's
// announce topic.
func New(t testing.TB, swarm string) *Peer {
	t.Helper()
	return NewOn(t, swarm, protocol.AnnounceTopic(swarm))
}

// NewOn starts a hostile peer of swarm on loopback TCP, on topic (a
// model's announce topic, say).
func NewOn(t testing.TB, swarm, topicName string) *Peer {
	t.Helper()
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	ps, err := pubsub.NewGossipSub(context.Background(), h,
		pubsub.WithFloodPublish(true),
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithMaxMessageSize(1<<20),
		// Deep queues: a flood must reach the victim, not die here.
		pubsub.WithPeerOutboundQueueSize(1<<14),
		pubsub.WithValidateQueueSize(1<<14),
	)
	if err != nil {
		t.Fatal(err)
	}
	topic, err := ps.Join(topicName)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := topic.Subscribe() // to be a topic peer of the victim
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Cancel)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return &Peer{t: t, H: h, PS: ps, Topic: topic, swarm: swarm, ctx: ctx, seq: uint64(time.Now().UnixMilli()) * 1000}
}

// Connect dials the victim and waits until it is a peer of the peer's
// topic, so that what is published next reaches it.
func (p *Peer) Connect(ctx context.Context, victim peer.AddrInfo) error {
	if err := p.H.Connect(ctx, victim); err != nil {
		return fmt.Errorf("hostile peer: connect: %w", err)
	}
	topic := p.Topic.String()
	for {
		for _, q := range p.PS.ListPeers(topic) {
			if q == victim.ID {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("hostile peer: victim never joined the topic: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Announce is a valid worker announcement of model with the given seq,
// stamped now.
func Announce(model string, seq uint64, addrs ...ma.Multiaddr) *pb.Announce {
	a := &pb.Announce{
		Seq: seq, TimeUnixMs: time.Now().UnixMilli(), TtlMs: 30_000,
		Roles: []string{"worker"}, Version: "hostile", Health: 100,
		Models:      []*pb.ModelInfo{{Name: model, Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, Backend: "demo", P50TtftMs: 1}},
		Load:        &pb.Load{MaxConcurrency: 64, MaxQueue: 64},
		Incarnation: 1,
	}
	for _, m := range addrs {
		a.Addrs = append(a.Addrs, m.Bytes())
	}
	return a
}

// NextSeq is the next seq of this peer's own announcements.
func (p *Peer) NextSeq() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seq++
	return p.seq
}

// PublishRaw publishes data signed by this peer's own key.
func (p *Peer) PublishRaw(ctx context.Context, data []byte) error {
	return p.Topic.Publish(ctx, data)
}

// AnnounceSelf publishes a valid announcement of model as this peer, with
// its listen addresses: it poses as a worker.
func (p *Peer) AnnounceSelf(ctx context.Context, model string) error {
	data, err := proto.Marshal(Announce(model, p.NextSeq(), p.H.Addrs()...))
	if err != nil {
		return err
	}
	return p.Topic.Publish(ctx, data)
}

// PublishAs publishes data on the peer's topic as the author key, not as
// this host: a Sybil's key, which no host holds.
func (p *Peer) PublishAs(ctx context.Context, key crypto.PrivKey, data []byte) error {
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return err
	}
	if err := p.Topic.Publish(ctx, data, pubsub.WithSecretKeyAndPeerId(key, id)); err != nil {
		return fmt.Errorf("hostile peer: publish as %s: %w", id, err)
	}
	return nil
}

// FloodFreshKeys publishes n valid announcements of model, each signed by
// a fresh key (a Sybil: n workers that do not exist), at most one per
// every (0: as fast as it can). Each announces addrs, which should be
// loopback addresses nobody listens on. It returns how many it published.
func (p *Peer) FloodFreshKeys(ctx context.Context, n int, model string, every time.Duration, addrs ...ma.Multiaddr) (int, error) {
	sent := 0
	for i := 0; i < n; i++ {
		key, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return sent, err
		}
		data, err := proto.Marshal(Announce(model, uint64(time.Now().UnixMilli())*1000, addrs...))
		if err != nil {
			return sent, err
		}
		if err := p.PublishAs(ctx, key, data); err != nil {
			return sent, err
		}
		sent++
		if every > 0 {
			select {
			case <-ctx.Done():
				return sent, ctx.Err()
			case <-time.After(every):
			}
		}
	}
	return sent, nil
}

// BurstFreshKeys sends victim n valid announcements of model on the
// peer's topic, each signed by a fresh key, in one gossipsub RPC: the
// victim's gossipsub hands all n to validation at once, as a swarm view
// gets hundreds of heartbeats and their forwarded copies together. The
// RPC goes from a host of its own (gossipsub keeps one inbound stream per
// peer and resets the other, which would race with the peer's own). It
// returns how many it sent.
func (p *Peer) BurstFreshKeys(ctx context.Context, victim peer.AddrInfo, n int, model string, addrs ...ma.Multiaddr) (int, error) {
	topic := p.Topic.String()
	rpc := &pubsubpb.RPC{}
	for i := range n {
		key, _, err := crypto.GenerateEd25519Key(rand.Reader)
		if err != nil {
			return 0, err
		}
		id, err := peer.IDFromPrivateKey(key)
		if err != nil {
			return 0, err
		}
		data, err := proto.Marshal(Announce(model, uint64(time.Now().UnixMilli())*1000, addrs...))
		if err != nil {
			return 0, err
		}
		seq := make([]byte, 8)
		binary.BigEndian.PutUint64(seq, uint64(i+1))
		m := &pubsubpb.Message{From: []byte(id), Data: data, Seqno: seq, Topic: &topic}
		// Gossipsub's signature: the prefix, then the message without
		// signature or key (an Ed25519 peer ID carries the key).
		unsigned, err := proto.Marshal(m)
		if err != nil {
			return 0, err
		}
		if m.Signature, err = key.Sign(append([]byte(pubsub.SignPrefix), unsigned...)); err != nil {
			return 0, err
		}
		rpc.Publish = append(rpc.Publish, m)
	}
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		return 0, err
	}
	p.t.Cleanup(func() { _ = h.Close() })
	if err := h.Connect(ctx, victim); err != nil {
		return 0, fmt.Errorf("hostile peer: connect: %w", err)
	}
	s, err := h.NewStream(ctx, victim.ID, pubsub.GossipSubID_v11)
	if err != nil {
		return 0, fmt.Errorf("hostile peer: gossip stream: %w", err)
	}
	defer s.Close()
	b, err := proto.Marshal(rpc)
	if err != nil {
		return 0, err
	}
	if _, err := s.Write(append(binary.AppendUvarint(nil, uint64(len(b))), b...)); err != nil {
		return 0, fmt.Errorf("hostile peer: write the burst: %w", err)
	}
	return n, nil
}

// Serve answers the swarm's query protocol with b until the test ends.
func (p *Peer) Serve(b Behaviour) {
	p.H.SetStreamHandler(protocol.QueryProtocol(p.swarm), Handler(p.ctx, p.H, b, func() { p.Queries.Add(1) }))
}

// OpenIdleStreams opens up to n streams of proto at victim and sends one
// byte of a frame length on each (a slowloris: the victim waits for the
// rest, which never comes); they stay open until the victim closes them
// or ctx ends. It returns how many the victim let it open.
func (p *Peer) OpenIdleStreams(ctx context.Context, victim peer.ID, proto libp2pproto.ID, n int) int {
	opened := 0
	for i := 0; i < n; i++ {
		s, err := p.H.NewStream(ctx, victim, proto)
		if err != nil {
			continue
		}
		// The byte also makes the lazy protocol negotiation happen.
		if _, err := s.Write([]byte{0x80}); err != nil {
			_ = s.Reset()
			continue
		}
		opened++
		context.AfterFunc(ctx, func() { _ = s.Reset() })
	}
	return opened
}
