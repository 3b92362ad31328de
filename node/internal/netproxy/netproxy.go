// Package netproxy forwards a test's loopback traffic to a host, late or
// not at all: a long path (a satellite link, a far relay) or a dead one
// (a killed process's host) between two real libp2p hosts. TCP carries
// connections, UDP the datagrams of QUIC.
package netproxy

import (
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// maxQueued bounds the chunks or datagrams in flight each way; a reader
// waits (TCP) or drops (UDP) beyond it.
const maxQueued = 1024

// split parts target into its IP and port and what follows them
// (/quic-v1, /p2p/…).
func split(t testing.TB, target ma.Multiaddr) (net.Addr, ma.Multiaddr) {
	t.Helper()
	if len(target) < 2 {
		t.Fatalf("netproxy: %s is no IP and port", target)
	}
	addr, err := manet.ToNetAddr(target[:2])
	if err != nil {
		t.Fatalf("netproxy: %s: %v", target, err)
	}
	return addr, target[2:]
}

// TCP forwards each connection made to the address it returns to target
// (/ip4/…/tcp/…), every byte oneWay late each way, until the test ends.
func TCP(t testing.TB, target ma.Multiaddr, oneWay time.Duration) ma.Multiaddr {
	t.Helper()
	to, tail := split(t, target)
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var open []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range open {
			c.Close()
		}
	})
	go func() {
		for {
			a, err := l.Accept()
			if err != nil {
				return
			}
			in := a.(*net.TCPConn)
			out, err := net.DialTCP("tcp4", nil, to.(*net.TCPAddr))
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			open = append(open, in, out)
			mu.Unlock()
			go func() {
				var wg sync.WaitGroup
				wg.Add(2)
				go func() { defer wg.Done(); copyLate(out, in, oneWay) }()
				go func() { defer wg.Done(); copyLate(in, out, oneWay) }()
				wg.Wait()
				in.Close()
				out.Close()
			}()
		}
	}()
	return ma.Join(ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", l.Addr().(*net.TCPAddr).Port)), tail)
}

// copyLate copies src to dst, each chunk oneWay after it was read, until
// src ends; then dst's way ends too: a half close after src's (EOF), so
// that the other way's bytes still in flight arrive, else a close. A
// failed write ends the copy.
func copyLate(dst, src *net.TCPConn, oneWay time.Duration) {
	type chunk struct {
		due time.Time
		b   []byte
	}
	q := make(chan chunk, maxQueued)
	done := make(chan struct{})
	var eof bool // set before q closes
	go func() {
		defer close(done)
		for c := range q {
			time.Sleep(time.Until(c.due))
			if _, err := dst.Write(c.b); err != nil {
				_ = dst.Close()
				_ = src.CloseRead() // wakes the reader below
				return
			}
		}
		if eof {
			_ = dst.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			select {
			case q <- chunk{time.Now().Add(oneWay), append([]byte(nil), buf[:n]...)}:
			case <-done:
				return // dst failed
			}
		}
		if err != nil {
			eof = err == io.EOF
			close(q)
			<-done
			return
		}
	}
}

// UDP forwards datagrams between one client and a server, oneWay late
// each way, until frozen: then it drops them all, as a killed process's
// host would (no reset, no close: a QUIC connection lingers).
type UDP struct {
	// Addr is the proxy's address, with the server's tail (/quic-v1).
	Addr   ma.Multiaddr
	frozen atomic.Bool
}

// Freeze drops every datagram from now on, both ways.
func (p *UDP) Freeze() { p.frozen.Store(true) }

// NewUDP forwards to target (/ip4/…/udp/…/quic-v1) until the test ends.
func NewUDP(t testing.TB, target ma.Multiaddr, oneWay time.Duration) *UDP {
	t.Helper()
	to, tail := split(t, target)
	front, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.DialUDP("udp4", nil, to.(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { front.Close(); back.Close() })
	p := &UDP{Addr: ma.Join(ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/udp/%d", front.LocalAddr().(*net.UDPAddr).Port)), tail)}
	var client atomic.Pointer[net.UDPAddr]
	toServer := p.late(oneWay, func(b []byte) { _, _ = back.Write(b) })
	toClient := p.late(oneWay, func(b []byte) {
		if c := client.Load(); c != nil {
			_, _ = front.WriteToUDP(b, c)
		}
	})
	go func() {
		defer close(toServer)
		buf := make([]byte, 65536)
		for {
			n, from, err := front.ReadFromUDP(buf)
			if err != nil {
				return
			}
			client.Store(from)
			send(toServer, oneWay, buf[:n])
		}
	}()
	go func() {
		defer close(toClient)
		buf := make([]byte, 65536)
		for {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			send(toClient, oneWay, buf[:n])
		}
	}()
	return p
}

type datagram struct {
	due time.Time
	b   []byte
}

// late returns a queue whose datagrams write sends oneWay after they were
// queued, unless the proxy is frozen by then.
func (p *UDP) late(oneWay time.Duration, write func([]byte)) chan<- datagram {
	q := make(chan datagram, maxQueued)
	go func() {
		for d := range q {
			time.Sleep(time.Until(d.due))
			if !p.frozen.Load() {
				write(d.b)
			}
		}
	}()
	return q
}

// send queues a copy of b, or drops it when the queue is full, as a
// router's buffer does.
func send(q chan<- datagram, oneWay time.Duration, b []byte) {
	select {
	case q <- datagram{time.Now().Add(oneWay), append([]byte(nil), b...)}:
	default:
	}
}
