package main

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"

	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node"
)

// errListenTaken: a --listen port is held by another process.
var errListenTaken = errors.New("address already in use")

// listenAddrs are the addresses the node will listen on: --listen, or the
// node's defaults.
func (f *nodeFlags) listenAddrs() []string {
	if len(f.listen) > 0 {
		return f.listen
	}
	return node.DefaultListenAddrs()
}

// checkListenFree refuses a fixed TCP or UDP port that another process
// already holds. libp2p's transports set SO_REUSEPORT, so a second node
// would bind the same port and the kernel would hand it half of the first
// node's incoming connections. A plain bind (Go's net.Listen does not set
// SO_REUSEPORT) fails when anyone holds the port, which is what we want to
// know; it is released at once for the node to take. Other bind errors
// (an address not on this machine) are left to the node, which reports
// them as it starts.
func checkListenFree(addrs []string, explicit bool) error {
	for _, s := range addrs {
		network, hostport, ok := bindArgs(s)
		if !ok {
			continue
		}
		var err error
		if network == "tcp" {
			var ln net.Listener
			if ln, err = net.Listen("tcp", hostport); err == nil {
				ln.Close()
			}
		} else {
			var pc net.PacketConn
			if pc, err = net.ListenPacket("udp", hostport); err == nil {
				pc.Close()
			}
		}
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			continue
		}
		flag := "--listen " + s
		if !explicit {
			flag = "--listen (default " + s + ")"
		}
		return fmt.Errorf("%s: %w: another program, probably another mtor node on this machine, holds %s port %s; "+
			"choose another port with --listen (port 0 takes any free one)", flag, errListenTaken, network, portOf(hostport))
	}
	return nil
}

// bindArgs turns /ip4|ip6/ADDR/tcp|udp/PORT/... into a network and
// HOST:PORT to bind; ok is false for port 0 (any free port) and for
// addresses that are not plain IP ones.
func bindArgs(s string) (network, hostport string, ok bool) {
	m, err := ma.NewMultiaddr(s)
	if err != nil {
		return "", "", false
	}
	ip, err := m.ValueForProtocol(ma.P_IP4)
	if err != nil {
		if ip, err = m.ValueForProtocol(ma.P_IP6); err != nil {
			return "", "", false
		}
	}
	port, err := m.ValueForProtocol(ma.P_TCP)
	network = "tcp"
	if err != nil {
		if port, err = m.ValueForProtocol(ma.P_UDP); err != nil {
			return "", "", false
		}
		network = "udp"
	}
	if p, err := strconv.Atoi(port); err != nil || p == 0 {
		return "", "", false
	}
	return network, net.JoinHostPort(ip, port), true
}

func portOf(hostport string) string {
	_, p, _ := net.SplitHostPort(hostport)
	return p
}
