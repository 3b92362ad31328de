// Package relayaddr tells relayed (circuit v2) addresses and connections
// from direct ones, for every package that treats the two apart.
package relayaddr

import (
	"github.com/libp2p/go-libp2p/core/network"
	ma "github.com/multiformats/go-multiaddr"
)

// IsCircuit reports whether a goes through a relay (holds /p2p-circuit).
func IsCircuit(a ma.Multiaddr) bool {
	_, err := a.ValueForProtocol(ma.P_CIRCUIT)
	return err == nil
}

// IsRelayed reports whether c runs through a relay.
func IsRelayed(c network.Conn) bool { return IsCircuit(c.RemoteMultiaddr()) }
