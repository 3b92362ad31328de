// Package protocol is mtor's wire format: protocol IDs, framing, the
// protobuf messages in protocol/pb, error codes and validation. It holds no
// libp2p host logic so that other implementations can follow it from
// docs/protocol.md alone.
package protocol

import (
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

// AnnounceTopic is the gossipsub topic on which workers announce.
func AnnounceTopic(swarm string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/announce/1"
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
