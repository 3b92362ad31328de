package discovery

import (
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/proto"
)

// Traffic is the gossip this node has sent and received since it started:
// every gossipsub RPC (announcements it publishes or forwards, IHAVE/IWANT
// gossip, GRAFT/PRUNE), measured as its protobuf size. It is how the
// announcement cost of a swarm is read without a bandwidth counter on
// every stream (which would also tax the query path).
type Traffic struct {
	RPCsIn    uint64 `json:"rpcs_in"`
	RPCsOut   uint64 `json:"rpcs_out"`
	BytesIn   uint64 `json:"bytes_in"`
	BytesOut  uint64 `json:"bytes_out"`
	MsgsIn    uint64 `json:"messages_in"`  // published messages received, duplicates included
	MsgsOut   uint64 `json:"messages_out"` // published messages sent, our own and forwarded
	Dropped   uint64 `json:"rpcs_dropped"` // outbound RPCs dropped on a full peer queue
	Delivered uint64 `json:"delivered"`    // announcements accepted and delivered
	// Received messages not delivered, by why: Ignored by the announce
	// validator (stale, expired, too frequent when forwarded, no room),
	// Rejected as invalid (a bad signature or announcement), Throttled
	// because gossipsub's validation queue was full (the node is behind:
	// the message is lost to it), Undeliverable because the
	// subscription's reader was behind (lost too).
	Ignored       uint64 `json:"ignored"`
	Rejected      uint64 `json:"rejected"`
	Throttled     uint64 `json:"throttled"`
	Undeliverable uint64 `json:"undeliverable"`
}

// trafficTracer counts gossip as a pubsub.RawTracer. Every method is a
// few atomic adds: gossipsub calls them on its event loop.
type trafficTracer struct {
	rpcsIn, rpcsOut, bytesIn, bytesOut atomic.Uint64
	msgsIn, msgsOut, dropped, delivd   atomic.Uint64
	ignored, rejected, throttled       atomic.Uint64
	undeliverable                      atomic.Uint64
}

var _ pubsub.RawTracer = (*trafficTracer)(nil)

func (t *trafficTracer) snapshot() Traffic {
	return Traffic{
		RPCsIn: t.rpcsIn.Load(), RPCsOut: t.rpcsOut.Load(),
		BytesIn: t.bytesIn.Load(), BytesOut: t.bytesOut.Load(),
		MsgsIn: t.msgsIn.Load(), MsgsOut: t.msgsOut.Load(),
		Dropped: t.dropped.Load(), Delivered: t.delivd.Load(),
		Ignored: t.ignored.Load(), Rejected: t.rejected.Load(),
		Throttled: t.throttled.Load(), Undeliverable: t.undeliverable.Load(),
	}
}

func (t *trafficTracer) RecvRPC(rpc *pubsub.RPC) {
	t.rpcsIn.Add(1)
	t.bytesIn.Add(uint64(proto.Size(&rpc.RPC)))
	t.msgsIn.Add(uint64(len(rpc.GetPublish())))
}

func (t *trafficTracer) SendRPC(rpc *pubsub.RPC, _ peer.ID) {
	t.rpcsOut.Add(1)
	t.bytesOut.Add(uint64(proto.Size(&rpc.RPC)))
	t.msgsOut.Add(uint64(len(rpc.GetPublish())))
}

// RejectMessage sorts refused messages by pubsub's reason. A message
// from ourselves is not counted.
func (t *trafficTracer) RejectMessage(_ *pubsub.Message, reason string) {
	switch reason {
	case pubsub.RejectSelfOrigin:
	case pubsub.RejectValidationIgnored:
		t.ignored.Add(1)
	case pubsub.RejectValidationQueueFull, pubsub.RejectValidationThrottled:
		t.throttled.Add(1)
	default:
		t.rejected.Add(1)
	}
}

func (t *trafficTracer) DropRPC(*pubsub.RPC, peer.ID)                         { t.dropped.Add(1) }
func (t *trafficTracer) DeliverMessage(*pubsub.Message)                       { t.delivd.Add(1) }
func (t *trafficTracer) AddPeer(peer.ID, protocol.ID)                         {}
func (t *trafficTracer) RemovePeer(peer.ID)                                   {}
func (t *trafficTracer) Join(string)                                          {}
func (t *trafficTracer) Leave(string)                                         {}
func (t *trafficTracer) Graft(peer.ID, string)                                {}
func (t *trafficTracer) Prune(peer.ID, string)                                {}
func (t *trafficTracer) ValidateMessage(*pubsub.Message)                      {}
func (t *trafficTracer) DuplicateMessage(*pubsub.Message)                     {}
func (t *trafficTracer) ThrottlePeer(peer.ID)                                 {}
func (t *trafficTracer) UndeliverableMessage(*pubsub.Message)                 { t.undeliverable.Add(1) }
func (t *trafficTracer) OnNewOutboundStream(peer.ID, protocol.ID)             {}
func (t *trafficTracer) OnClosedOutboundStream(peer.ID)                       {}
func (t *trafficTracer) SendRPCCompleted(*pubsub.RPC, peer.ID, time.Duration) {}
