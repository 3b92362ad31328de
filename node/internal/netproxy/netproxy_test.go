package netproxy

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

const oneWay = 100 * time.Millisecond

// tcpEcho is a TCP server on loopback that sends back what it reads.
func tcpEcho(t *testing.T) ma.Multiaddr {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf", l.Addr().(*net.TCPAddr).Port))
}

// dial connects to a proxy's address, its tail left off.
func dial(t *testing.T, network string, a ma.Multiaddr) net.Conn {
	t.Helper()
	addr, err := manet.ToNetAddr(a[:2])
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial(network, addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// The TCP proxy keeps the target's tail, carries every byte in order,
// each oneWay late each way, and passes the client's close on.
func TestTCPCarriesBytesLate(t *testing.T) {
	target := tcpEcho(t)
	p := TCP(t, target, oneWay)
	if got, want := p[2:].String(), target[2:].String(); got != want {
		t.Fatalf("the proxy's address ends %s, want the target's %s", got, want)
	}
	c := dial(t, "tcp4", p)
	msg := make([]byte, 1<<20) // many reads' worth
	_, _ = rand.Read(msg)
	start := time.Now()
	go func() {
		_, _ = c.Write(msg)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the echo: %v (the client's close not passed on?)", err)
	}
	if took := time.Since(start); took < 2*oneWay {
		t.Errorf("the echo came back in %s, want %s at the least (oneWay each way)", took, 2*oneWay)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echoed %d bytes, not the %d sent in order", len(got), len(msg))
	}
}

// A connection the target refuses is closed at once.
func TestTCPRefusedTarget(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close() // nothing listens there now
	p := TCP(t, ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)), oneWay)
	c := dial(t, "tcp4", p)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("read %d bytes, %v; want the connection closed (EOF)", n, err)
	}
}

// udpEcho is a UDP server on loopback that sends each datagram back.
func udpEcho(t *testing.T) ma.Multiaddr {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteToUDP(buf[:n], from)
		}
	}()
	return ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/udp/%d/quic-v1", pc.LocalAddr().(*net.UDPAddr).Port))
}

// The UDP proxy keeps the target's tail, carries datagrams each oneWay
// late each way, and drops them all once frozen, both ways, without a
// word to either end.
func TestUDPCarriesDatagramsLateUntilFrozen(t *testing.T) {
	target := udpEcho(t)
	p := NewUDP(t, target, oneWay)
	if got, want := p.Addr[2:].String(), target[2:].String(); got != want {
		t.Fatalf("the proxy's address ends %s, want the target's %s", got, want)
	}
	c := dial(t, "udp4", p.Addr)
	buf := make([]byte, 2048)
	for i := range 3 {
		msg := []byte(fmt.Sprintf("datagram %d", i))
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("datagram %d: no echo: %v", i, err)
		}
		if took := time.Since(start); took < 2*oneWay {
			t.Errorf("datagram %d came back in %s, want %s at the least", i, took, 2*oneWay)
		}
		if !bytes.Equal(buf[:n], msg) {
			t.Fatalf("echoed %q, want %q", buf[:n], msg)
		}
	}
	// One in flight when the proxy freezes, past the server (which
	// answered it) and on its way back, is dropped.
	if _, err := c.Write([]byte("in flight")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(oneWay * 3 / 2)
	p.Freeze()
	if _, err := c.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * oneWay))
	if n, err := c.Read(buf); err == nil {
		t.Fatalf("frozen, the proxy passed %q on", buf[:n])
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("frozen: %v, want silence (a read timeout), not an error the client is told", err)
	}
}
