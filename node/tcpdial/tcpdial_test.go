package tcpdial

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-reuseport"
	ma "github.com/multiformats/go-multiaddr"
)

// listenReuse listens on addr with SO_REUSEPORT, as the host's TCP
// transport does, and accepts (and keeps) what comes.
func listenReuse(t *testing.T, addr string) (*net.TCPAddr, <-chan net.Conn) {
	t.Helper()
	l, err := reuseport.Listen("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			accepted <- c
		}
	}()
	return l.Addr().(*net.TCPAddr), accepted
}

// freePort is a loopback port nothing listens on (a dial to it is refused).
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// attached is a dialer that dials from the listen addresses given.
func attached(addrs ...string) *Dialer {
	d := New()
	d.reuse = true
	f := func() []ma.Multiaddr {
		var out []ma.Multiaddr
		for _, a := range addrs {
			out = append(out, ma.StringCast(a))
		}
		return out
	}
	d.listen.Store(&f)
	return d
}

func punchCtx(ctx context.Context) context.Context {
	return network.WithSimultaneousConnect(ctx, true, "hole-punching")
}

// A hole punch's SYN refused by the far side (its NAT answered before its
// host's SYN opened it) is sent again from the listen port, and connects
// once the far side takes it; go-libp2p's own dialer would dial once more
// from a random port, which no NAT maps as the punch needs.
func TestPunchDialRetriesRefusalFromListenPort(t *testing.T) {
	home, _ := listenReuse(t, "127.0.0.1:0")
	d := attached(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", home.Port))
	far := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	// The far side listens once the first dial was refused: the next
	// try, a pause later, finds it.
	var refused int
	var acc <-chan net.Conn
	d.onRefused = func(tries int) {
		refused = tries
		if acc == nil {
			_, acc = listenReuse(t, far)
		}
	}
	ctx, cancel := context.WithTimeout(punchCtx(context.Background()), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp4", far)
	if err != nil {
		t.Fatalf("punch dial: %v, want it connected once the far side listens", err)
	}
	defer c.Close()
	if refused != 1 {
		t.Errorf("%d refused dials before the one that connected, want 1", refused)
	}
	if got := c.LocalAddr().(*net.TCPAddr).Port; got != home.Port {
		t.Errorf("punch dial left from port %d, want the listen port %d", got, home.Port)
	}
	select {
	case in := <-acc:
		if got := in.RemoteAddr().(*net.TCPAddr).Port; got != home.Port {
			t.Errorf("the far side saw port %d, want %d", got, home.Port)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the far side accepted nothing")
	}
}

// Outside a punch a refusal is the answer: returned as the listen port's
// dial met it, not dialed again from that port or another.
func TestOrdinaryDialRefusedIsReturned(t *testing.T) {
	home, _ := listenReuse(t, "127.0.0.1:0")
	d := attached(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", home.Port))
	d.onRefused = func(int) { t.Error("an ordinary dial's refusal was retried") }
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := d.DialContext(ctx, "tcp4", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial: %v, want connection refused", err)
	}
	// A dial from a random port names no source; the listen port's does.
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Source == nil || oe.Source.(*net.TCPAddr).Port != home.Port {
		t.Errorf("the refusal %v is not the listen port's (%d) dial's, want no redial from another port", err, home.Port)
	}
}

// A punch whose dials are all refused ends after punchTries of them, at
// pauses that double, and says how many it made: a closed port a
// stranger's punch names gets a few SYNs, not one per pause until the
// punch's end.
func TestPunchDialRefusedEndsAfterItsTries(t *testing.T) {
	home, _ := listenReuse(t, "127.0.0.1:0")
	d := attached(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", home.Port))
	d.pause = 10 * time.Millisecond
	ctx, cancel := context.WithTimeout(punchCtx(context.Background()), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := d.DialContext(ctx, "tcp4", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	took := time.Since(start)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial: %v, want connection refused", err)
	}
	if ctx.Err() != nil {
		t.Fatalf("the dial lasted the punch's 5 s, want it ended after %d tries", punchTries)
	}
	var tries int
	msg := err.Error()
	if _, serr := fmt.Sscanf(msg[strings.LastIndex(msg, "(hole punch, "):], "(hole punch, %d dials", &tries); serr != nil {
		t.Fatalf("no count of tries in %q: %v", msg, serr)
	}
	if tries != punchTries {
		t.Errorf("%d tries, want %d", tries, punchTries)
	}
	// Pauses of 10, 20 and 40 ms: at least 70 ms (30 ms had they not grown).
	if took < 70*time.Millisecond {
		t.Errorf("the tries took %s, want pauses that double from 10 ms (70 ms at least)", took)
	}
}

// When the listen port cannot be bound for the destination (a connection
// of the same four-tuple exists), an ordinary dial leaves from a random
// port; a punch's ends there, since no NAT maps a random port for it.
func TestBusyFourTuple(t *testing.T) {
	home, _ := listenReuse(t, "127.0.0.1:0")
	d := attached(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", home.Port))
	for _, punch := range []bool{false, true} {
		far, _ := listenReuse(t, "127.0.0.1:0") // a four-tuple of its own (the last one's is in TIME-WAIT)
		first, err := d.DialContext(context.Background(), "tcp4", far.String())
		if err != nil {
			t.Fatal(err)
		}
		if got := first.LocalAddr().(*net.TCPAddr).Port; got != home.Port {
			t.Fatalf("first dial from port %d, want the listen port %d", got, home.Port)
		}
		ctx := context.Background()
		if punch {
			ctx = punchCtx(ctx)
		}
		second, err := d.DialContext(ctx, "tcp4", far.String())
		switch {
		case punch && !errors.Is(err, syscall.EADDRNOTAVAIL):
			t.Errorf("punch dial while a connection of its four-tuple is open: %v, want address not available", err)
		case !punch && err != nil:
			t.Errorf("dial while a connection of its four-tuple is open: %v, want one from a random port", err)
		case !punch && second.LocalAddr().(*net.TCPAddr).Port == home.Port:
			t.Errorf("second dial from the listen port %d, want a random one", home.Port)
		}
		if second != nil {
			second.Close()
		}
		first.Close()
	}
}

// The source address of a dial, as go-libp2p's dialer picks it.
func TestSource(t *testing.T) {
	route := func(net.IP) (net.IP, error) { return net.ParseIP("192.0.2.7"), nil }
	for _, tc := range []struct {
		name   string
		listen []string
		to     string
		want   string // "" for a random port
		reuse  bool
	}{
		{"unspecified, to a remote", []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"}, "198.51.100.1:4001", "0.0.0.0:4001", true},
		{"unspecified, to loopback", []string{"/ip4/0.0.0.0/tcp/4001"}, "127.0.0.1:4001", "0.0.0.0:4001", true},
		{"loopback, to loopback", []string{"/ip4/127.0.0.1/tcp/4002", "/ip4/0.0.0.0/tcp/4001"}, "127.0.0.1:9", "127.0.0.1:4002", true},
		{"loopback only, to a remote", []string{"/ip4/127.0.0.1/tcp/4002"}, "198.51.100.1:4001", "", true},
		{"specific, the route's source", []string{"/ip4/192.0.2.7/tcp/4003", "/ip4/0.0.0.0/tcp/4001"}, "198.51.100.1:4001", "192.0.2.7:4003", true},
		{"specific, not the route's source", []string{"/ip4/192.0.2.8/tcp/4003", "/ip4/0.0.0.0/tcp/4001"}, "198.51.100.1:4001", "0.0.0.0:4001", true},
		{"IPv6 only, to IPv4", []string{"/ip6/::/tcp/4001"}, "198.51.100.1:4001", "", true},
		{"IPv6, to IPv6", []string{"/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4005"}, "[2001:db8::1]:4001", "[::]:4005", true},
		{"QUIC and relay addresses only", []string{"/ip4/0.0.0.0/udp/4001/quic-v1", "/p2p-circuit"}, "198.51.100.1:4001", "", true},
		{"no SO_REUSEPORT", []string{"/ip4/0.0.0.0/tcp/4001"}, "198.51.100.1:4001", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := attached(tc.listen...)
			d.route, d.reuse = route, tc.reuse
			to, err := net.ResolveTCPAddr("tcp", tc.to)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			if a := d.source(to); a != nil {
				got = a.String()
			}
			if got != tc.want {
				t.Errorf("source %q, want %q", got, tc.want)
			}
		})
	}
	if New().source(&net.TCPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 1}) != nil {
		t.Error("a dialer not attached picked a source, want a random port")
	}
}
