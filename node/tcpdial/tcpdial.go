// Package tcpdial is the dialer of the host's TCP transport. Like
// go-libp2p's own (p2p/net/reuseport), it dials from the port the host
// listens on, so that a NAT maps an outgoing connection to the port it
// maps the listener to: what a TCP hole punch needs, and what lets a
// peer learn the host's public TCP address from its connections. It
// differs in what it does when that dial fails:
//
//   - go-libp2p's redials from a random port on any error but a timeout
//     (it looks for a bare errno, and the dialer's errors are wrapped),
//     refusals included. In a hole punch a random port cannot open the
//     NAT, so a punch whose first SYN was refused is lost. That happens
//     whenever the SYN reaches the far NAT before the far host's own SYN
//     went out, and that NAT answers it with a reset or an ICMP error
//     instead of dropping it, as OpenWrt's default firewall does.
//   - Here a hole punch's refused dial is tried again from the same port
//     (retryPause, doubling, punchTries in all, within the punch's
//     deadline): by then the far host's SYN has opened its NAT for this
//     one. Where both NATs answer, each SYN can close the other's way in
//     turn, and the punch opens only if two SYNs cross on the way.
//
// Outside a punch a random port is used where the listener's port cannot
// be bound for the destination (a connection or TIME-WAIT of the same
// four-tuple) and after an error a random port might not meet; a refusal
// or an unreachable network is returned as it is. In a punch a random
// port is never used: no NAT maps it for the punch.
package tcpdial

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	"github.com/libp2p/go-libp2p/p2p/transport/tcpreuse"
	"github.com/libp2p/go-netroute"
	"github.com/libp2p/go-reuseport"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

var log = logging.Logger("mtor/tcpdial")

// retryPause is the wait before a hole punch's refused dial is tried
// again: well under the second after which the far host sends its SYN
// again, so that the retry reaches the far NAT while that host's SYN
// keeps it open. The pause doubles with each refusal, for punchTries in
// all: a punch names addresses a stranger may have chosen.
const retryPause = 100 * time.Millisecond

// punchTries bounds a punch's dials from the listen port to one address:
// the far host's SYN, if it comes, opens its NAT within a round trip of
// ours, so a refusal that lasts the pauses of three retries (700 ms by
// default) is the address's answer. A stranger's punch thus buys at most
// four SYNs to an address that refuses, where go-libp2p's dialer sends
// two (its redial from a random port).
const punchTries = 4

// Dialer dials TCP for the transport (tcp.WithDialerForAddr(d.ForAddr)).
type Dialer struct {
	// listen gives the host's listen addresses; nil until Attach, when
	// dials go out from a random port.
	listen atomic.Pointer[func() []ma.Multiaddr]
	pause  time.Duration
	// route gives the preferred source address towards an IP, for a host
	// that listens on specific addresses (as go-libp2p's dialer does).
	route func(net.IP) (net.IP, error)
	// reuse reports whether the transport listens with SO_REUSEPORT: the
	// listener's port can be bound for a dial only then.
	reuse bool
	// onRefused, for tests, hears of each refused punch dial it retries.
	onRefused func(tries int)
}

// New returns a dialer that dials from a random port until Attach.
func New() *Dialer {
	return &Dialer{pause: retryPause, route: preferredSource, reuse: tcpreuse.ReuseportIsAvailable()}
}

// Attach makes the dialer dial from the ports of n's TCP listeners.
func (d *Dialer) Attach(n network.Network) {
	f := n.ListenAddresses
	d.listen.Store(&f)
}

// ForAddr is the transport's dialer for any address (tcp.DialerForAddr).
func (d *Dialer) ForAddr(ma.Multiaddr) (tcp.ContextDialer, error) { return d, nil }

// DialContext dials address from the listener's port that suits it, or
// from a random port where there is none.
func (d *Dialer) DialContext(ctx context.Context, netw, address string) (net.Conn, error) {
	raddr, err := net.ResolveTCPAddr(netw, address)
	if err != nil {
		return nil, err
	}
	laddr := d.source(raddr)
	if laddr == nil {
		return fromRandomPort(ctx, netw, address)
	}
	punch, _, _ := network.GetSimultaneousConnect(ctx)
	pause := d.pause
	for tries := 1; ; tries++ {
		rd := net.Dialer{LocalAddr: laddr, Control: reuseport.Control}
		c, err := rd.DialContext(ctx, netw, address)
		if err == nil {
			if tries > 1 {
				log.Debugw("hole punch dial connected from the listen port", "to", address, "from", laddr, "tries", tries)
			}
			return c, nil
		}
		switch classify(err) {
		case portBusy:
			if punch {
				// A connection of this four-tuple exists (the far
				// host's SYN may have reached the listener): a random
				// port would only send a SYN no NAT maps for the punch.
				return nil, err
			}
			log.Debugw("listen port busy for this destination; dialing from a random port", "to", address, "from", laddr, "err", err)
			return fromRandomPort(ctx, netw, address)
		case answered:
			if !punch || ctx.Err() != nil {
				return nil, err
			}
			if tries >= punchTries {
				return nil, fmt.Errorf("%w (hole punch, %d dials from %s)", err, tries, laddr)
			}
			if d.onRefused != nil {
				d.onRefused(tries)
			}
			// The far NAT answered before the far host's SYN opened it.
			log.Debugw("hole punch dial refused; trying the same port again", "to", address, "from", laddr, "err", err, "try", tries)
			t := time.NewTimer(pause)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, fmt.Errorf("%w (hole punch, %d dials from %s)", err, tries, laddr)
			case <-t.C:
			}
			pause *= 2
		case final:
			return nil, err
		default: // unknown: a random port may not meet it
			if punch || ctx.Err() != nil {
				return nil, err
			}
			log.Debugw("dial from the listen port failed; dialing from a random port", "to", address, "from", laddr, "err", err)
			return fromRandomPort(ctx, netw, address)
		}
	}
}

func fromRandomPort(ctx context.Context, netw, address string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, netw, address)
}

type failure int

const (
	unknown  failure = iota
	portBusy         // the local address and port cannot be bound for this destination
	answered         // the far side (or a router on the way) said no
	final            // a timeout or the dial's end: another port fares no better
)

func classify(err error) failure {
	var ne net.Error
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return final
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return unknown
	}
	switch errno {
	case syscall.EADDRINUSE, syscall.EADDRNOTAVAIL:
		return portBusy
	case syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.EHOSTUNREACH, syscall.ENETUNREACH:
		return answered
	}
	return unknown
}

// source picks the listen address to dial raddr from, as go-libp2p's
// dialer does: a specific address that is the route's preferred source,
// then a loopback one for a loopback destination, then an unspecified
// one (0.0.0.0 or ::); nil for a random port.
func (d *Dialer) source(raddr *net.TCPAddr) *net.TCPAddr {
	f := d.listen.Load()
	if f == nil || !d.reuse {
		return nil
	}
	v4 := raddr.IP.To4() != nil
	var specific, loopback, unspecified []*net.TCPAddr
	for _, a := range (*f)() {
		na, err := manet.ToNetAddr(a)
		if err != nil {
			continue
		}
		ta, ok := na.(*net.TCPAddr)
		if !ok || ta.Port == 0 || (ta.IP.To4() != nil) != v4 {
			continue
		}
		switch {
		case ta.IP.IsLoopback():
			loopback = append(loopback, ta)
		case ta.IP.IsUnspecified():
			unspecified = append(unspecified, ta)
		default:
			specific = append(specific, ta)
		}
	}
	if len(specific) > 0 && d.route != nil {
		if src, err := d.route(raddr.IP); err == nil {
			for _, a := range specific {
				if a.IP.Equal(src) {
					return a
				}
			}
		}
	}
	if raddr.IP.IsLoopback() && len(loopback) > 0 {
		return loopback[rand.IntN(len(loopback))]
	}
	if len(unspecified) > 0 {
		return unspecified[rand.IntN(len(unspecified))]
	}
	return nil
}

func preferredSource(ip net.IP) (net.IP, error) {
	r, err := netroute.New()
	if err != nil {
		return nil, err
	}
	_, _, src, err := r.Route(ip)
	return src, err
}
