// Package protocol is mtor's wire format: protocol IDs, framing, the
// protobuf messages in protocol/pb, error codes and validation. It holds no
// libp2p host logic so that other implementations can follow it from
// docs/protocol.md alone.
package protocol

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"regexp"

	"github.com/libp2p/go-libp2p/core/protocol"
)

// DefaultSwarm is the swarm a node joins when none is named.
const DefaultSwarm = "mtor"

// Version is the protocol version spoken by this build.
const Version = "1.0.0"

// swarmRe bounds swarm names: they appear inside protocol IDs, topic names
// and DHT prefixes, so they must be short and path-safe.
var swarmRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,31}$`)

// ValidateSwarm reports whether name can be used as a swarm name.
func ValidateSwarm(name string) error {
	if !swarmRe.MatchString(name) {
		return fmt.Errorf("invalid swarm name %q: want 1-32 chars of [a-z0-9._-], starting with a letter or digit", name)
	}
	return nil
}

// QueryProtocol is the stream protocol for queries. The default swarm uses
// the plain ID; other swarms are namespaced so that nodes of different
// swarms never speak to each other by accident.
func QueryProtocol(swarm string) protocol.ID {
	if swarm == "" || swarm == DefaultSwarm {
		return "/mtor/query/" + Version
	}
	return protocol.ID("/mtor/" + swarm + "/query/" + Version)
}

// ReceiptProtocol is the stream protocol on which a routing node returns
// countersigned receipts to the workers that signed them; namespaced like
// QueryProtocol.
func ReceiptProtocol(swarm string) protocol.ID {
	if swarm == "" || swarm == DefaultSwarm {
		return "/mtor/receipt/" + Version
	}
	return protocol.ID("/mtor/" + swarm + "/receipt/" + Version)
}

// ReceiptBatchProtocol is the receipt protocol whose receipts may be
// countersigned in a batch (Receipt.router_batch): version 1.1.0 of
// ReceiptProtocol, which a worker that does not speak it is sent instead.
func ReceiptBatchProtocol(swarm string) protocol.ID {
	if swarm == "" || swarm == DefaultSwarm {
		return "/mtor/receipt/" + receiptBatchVersion
	}
	return protocol.ID("/mtor/" + swarm + "/receipt/" + receiptBatchVersion)
}

const receiptBatchVersion = "1.1.0"

// AnnounceTopic is the gossipsub topic on which workers announce.
func AnnounceTopic(swarm string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/announce/1"
}

// ModelTopic is the gossipsub topic on which the workers of one model
// announce, for the nodes that route to that model (version 1 of the
// per-model topics). The model name is hashed so that the name is bounded
// (32 hex digits) and free of characters a topic name should not carry.
func ModelTopic(swarm, model string) string {
	sum := sha256.Sum256([]byte(model))
	return AnnounceTopic(swarm) + "/m/" + hex.EncodeToString(sum[:16])
}

// RelayTopic is the gossipsub topic on which relays (nodes announcing the
// "relay" role) publish their announcements too, for the nodes without the
// swarm view that need a relay. Model topics end in /m/<hex>: no clash.
func RelayTopic(swarm string) string {
	return AnnounceTopic(swarm) + "/relay"
}

// PresenceTopic is a gossipsub topic every node subscribes to and nobody
// publishes on: a peer seen there has a working gossip link with us, even
// when it subscribes to no announce topic.
func PresenceTopic(swarm string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/presence/1"
}

// DHTPrefix is the private Kademlia protocol prefix of a swarm.
func DHTPrefix(swarm string) protocol.ID {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return protocol.ID("/mtor/" + swarm)
}

// ModelKey is the string hashed into the DHT provider key of a model.
func ModelKey(swarm, model string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/model/" + model
}

// RelayKey is the string hashed into the DHT provider key under which
// relays provide. Model keys have a /model/ segment: no clash.
func RelayKey(swarm string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/relay"
}
