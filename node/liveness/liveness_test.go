package liveness

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/internal/netproxy"
)

func newHost(t *testing.T, listen string, opts ...libp2p.Option) host.Host {
	t.Helper()
	h, err := libp2p.New(append([]libp2p.Option{libp2p.ListenAddrStrings(listen)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// checked connects a to b and starts a checker on a with a 500 ms
// timeout; it returns the checker and a's one connection to b.
func checked(t *testing.T, a, b host.Host) (*Checker, network.Conn) {
	t.Helper()
	if err := a.Connect(t.Context(), peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
		t.Fatal(err)
	}
	c := New(a, WithTimeout(500*time.Millisecond))
	t.Cleanup(c.Close)
	return c, onlyConn(t, a, b.ID())
}

// suspectKept suspects conn and checks that the checker keeps it.
func suspectKept(t *testing.T, c *Checker, conn network.Conn, what string) {
	t.Helper()
	c.Suspect(conn)
	time.Sleep(700 * time.Millisecond)
	if conn.IsClosed() || c.Dead(conn) || c.Closed() != 0 {
		t.Fatalf("%s: closed %v, dead %v, closed count %d; want it kept", what, conn.IsClosed(), c.Dead(conn), c.Closed())
	}
}

func onlyConn(t *testing.T, h host.Host, p peer.ID) network.Conn {
	t.Helper()
	conns := h.Network().ConnsToPeer(p)
	if len(conns) != 1 {
		t.Fatalf("%d connections, want 1", len(conns))
	}
	return conns[0]
}

// TestSuspectKeepsLiveAndClosesDeadConnections, on both default
// transports: a connection whose peer answers pings stays open; one whose
// peer no longer does (it stands in for a frozen or vanished process: the
// ping handler is gone, the connection is not) is closed and remembered
// as dead.
func TestSuspectKeepsLiveAndClosesDeadConnections(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) {
			a, b := newHost(t, listen), newHost(t, listen)
			c, conn := checked(t, a, b)
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			if err := Probe(ctx, conn); err != nil {
				t.Fatalf("probe of a live peer: %v", err)
			}
			suspectKept(t, c, conn, "a live connection")

			b.RemoveStreamHandler(ping.ID)
			c.Suspect(conn)
			deadline := time.Now().Add(5 * time.Second)
			for !conn.IsClosed() {
				if time.Now().After(deadline) {
					t.Fatal("the connection to a peer that does not answer is still open")
				}
				time.Sleep(20 * time.Millisecond)
			}
			if !c.Dead(conn) || c.Closed() != 1 {
				t.Fatalf("dead = %v, closed = %d; want true, 1", c.Dead(conn), c.Closed())
			}
		})
	}
}

// TestSuspectKeepsARefusingPeer, on both default transports: a peer that
// resets the probe's stream at its resource limit (as libp2p does past 2
// inbound pings from one peer) is alive on that connection, which stays.
func TestSuspectKeepsARefusingPeer(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) {
			a, b := newHost(t, listen), newHost(t, listen)
			b.SetStreamHandler(ping.ID, func(s network.Stream) { _ = s.ResetWithError(network.StreamResourceLimitExceeded) })
			c, conn := checked(t, a, b)
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			err := Probe(ctx, conn)
			var se *network.StreamError
			if !errors.As(err, &se) || !se.Remote || se.ErrorCode != network.StreamResourceLimitExceeded {
				t.Fatalf("probe of a refusing peer: %v; want its reset at the resource limit", err)
			}
			suspectKept(t, c, conn, "a refusing peer's connection")
		})
	}
}

// TestRestartedPeerClosesItsOldConnection: a peer restarts (a new host
// with the same identity) while its old process still holds a connection
// open but answers nothing (the ping handler is gone, as in a frozen or
// vanished process). When the new process connects, the old connection
// is probed and closed; the new one stays.
func TestRestartedPeerClosesItsOldConnection(t *testing.T) {
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	a := newHost(t, "/ip4/127.0.0.1/tcp/0")
	c := New(a, WithTimeout(500*time.Millisecond))
	defer c.Close()
	oldProc, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings("/ip4/127.0.0.1/udp/0/quic-v1"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { oldProc.Close() })
	if err := oldProc.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}); err != nil {
		t.Fatal(err)
	}
	old := onlyConn(t, a, oldProc.ID())
	oldProc.RemoveStreamHandler(ping.ID)

	newProc, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { newProc.Close() })
	if err := newProc.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: a.Addrs()}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !old.IsClosed() {
		if time.Now().After(deadline) {
			t.Fatalf("the old process's connection is still open (%d connections)", len(a.Network().ConnsToPeer(oldProc.ID())))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if conns := a.Network().ConnsToPeer(newProc.ID()); len(conns) != 1 || conns[0] == old {
		t.Fatalf("%d connections left, want the new process's one", len(conns))
	}
}

// TestSuspectKeepsAConnectionOurLimitsBlock, on both default transports:
// when our own resource manager refuses the probe's stream (too many
// streams to that peer already), the peer has not failed to answer, and
// its connection stays.
func TestSuspectKeepsAConnectionOurLimitsBlock(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) {
			limits := rcmgr.PartialLimitConfig{PeerDefault: rcmgr.ResourceLimits{StreamsOutbound: rcmgr.BlockAllLimit}}
			rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.Build(rcmgr.DefaultLimits.AutoScale())))
			if err != nil {
				t.Fatal(err)
			}
			a, b := newHost(t, listen, libp2p.ResourceManager(rm)), newHost(t, listen)
			c, conn := checked(t, a, b)
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
			defer cancel()
			if err := Probe(ctx, conn); !errors.Is(err, network.ErrResourceLimitExceeded) {
				t.Fatalf("probe past our own stream limit: %v; want %v", err, network.ErrResourceLimitExceeded)
			}
			suspectKept(t, c, conn, "a connection our limits block")
		})
	}
}

// TestProbeOverALimitedRelayedConnection: a connection through a relay
// that limits its circuits (libp2p's default, another swarm's relay) is
// probed like any other, and found alive, not taken for dead.
// Over TCP and QUIC to the relay.
func TestProbeOverALimitedRelayedConnection(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) { testProbeOverALimitedRelayedConnection(t, listen) })
	}
}

func testProbeOverALimitedRelayedConnection(t *testing.T, listen string) {
	r := newHost(t, listen, libp2p.EnableRelayService(), libp2p.ForceReachabilityPublic())
	w, err := libp2p.New(libp2p.NoListenAddrs, libp2p.EnableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	if _, err := client.Reserve(t.Context(), w, peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}); err != nil {
		t.Fatal(err)
	}
	h := newHost(t, listen, libp2p.EnableRelay())
	circuit := ma.Join(r.Addrs()[0], ma.StringCast("/p2p/"+r.ID().String()+"/p2p-circuit"))
	ctx := network.WithAllowLimitedConn(t.Context(), "test")
	if err := h.Connect(ctx, peer.AddrInfo{ID: w.ID(), Addrs: []ma.Multiaddr{circuit}}); err != nil {
		t.Fatal(err)
	}
	conns := h.Network().ConnsToPeer(w.ID())
	if len(conns) != 1 || !conns[0].Stat().Limited {
		t.Fatalf("%d connections, want one limited relayed one", len(conns))
	}
	pctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := Probe(pctx, conns[0]); err != nil {
		t.Fatalf("probe over a live limited connection: %v", err)
	}
}

// TestCheckTellsWhoAnswered, on both default transports: Check reports
// Alive for a peer that echoes, one that negotiates ping and never
// echoes, one that refuses the protocol and one that resets the stream
// (the last three are alive though no use for a ping); Unknown when our
// own limit keeps the probe from running; Dead for a peer that is gone.
func TestCheckTellsWhoAnswered(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		for _, tc := range []struct {
			name   string
			peer   func(b host.Host)
			ours   []libp2p.Option
			want   Outcome
			closed bool // the checker closes the connection
		}{
			{"echoes", func(host.Host) {}, nil, Alive, false},
			{"negotiates, never echoes", func(b host.Host) {
				b.SetStreamHandler(ping.ID, func(s network.Stream) { _, _ = io.Copy(io.Discard, s) })
			}, nil, Alive, true},
			{"refuses the protocol", func(b host.Host) { b.RemoveStreamHandler(ping.ID) }, nil, Alive, true},
			{"resets", func(b host.Host) {
				b.SetStreamHandler(ping.ID, func(s network.Stream) { _ = s.ResetWithError(network.StreamResourceLimitExceeded) })
			}, nil, Alive, false},
			{"our limit", func(host.Host) {}, []libp2p.Option{blockOutboundStreams(t)}, Unknown, false},
			{"gone", func(b host.Host) { _ = b.Close() }, nil, Dead, true},
		} {
			t.Run(listen+"/"+tc.name, func(t *testing.T) {
				a, b := newHost(t, listen, tc.ours...), newHost(t, listen)
				c, conn := checked(t, a, b)
				tc.peer(b)
				got := make(chan Outcome, 2)
				c.Check(conn, func(o Outcome) { got <- o })
				c.Check(conn, func(o Outcome) { got <- o }) // joins the probe under way
				for range 2 {
					select {
					case o := <-got:
						if o != tc.want {
							t.Fatalf("outcome %s, want %s", o, tc.want)
						}
					case <-time.After(5 * time.Second):
						t.Fatal("no outcome within 5 s")
					}
				}
				time.Sleep(100 * time.Millisecond)
				if conn.IsClosed() != tc.closed {
					t.Fatalf("connection closed %v, want %v", conn.IsClosed(), tc.closed)
				}
			})
		}
	}
}

// blockOutboundStreams is a resource manager that opens no stream.
func blockOutboundStreams(t *testing.T) libp2p.Option {
	limits := rcmgr.PartialLimitConfig{PeerDefault: rcmgr.ResourceLimits{StreamsOutbound: rcmgr.BlockAllLimit}}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits.Build(rcmgr.DefaultLimits.AutoScale())))
	if err != nil {
		t.Fatal(err)
	}
	return libp2p.ResourceManager(rm)
}

func TestEchoDeadline(t *testing.T) {
	start := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	const base = 2 * time.Second
	for _, c := range []struct {
		name       string
		negotiated time.Duration // after start
		want       time.Duration // after start
	}{
		{"at once (loopback)", 0, base},
		{"a LAN", time.Millisecond, base},
		{"across the world", 300 * time.Millisecond, base},
		{"the break-even", 666 * time.Millisecond, base},
		{"a satellite", time.Second, 3 * time.Second},
		{"a relayed satellite", 1400 * time.Millisecond, 4200 * time.Millisecond},
		{"at the base's end", base, 3 * base},
	} {
		got := echoDeadline(start, start.Add(c.negotiated), base).Sub(start)
		if got != c.want {
			t.Errorf("%s: negotiated after %v, echo until %v; want %v", c.name, c.negotiated, got, c.want)
		}
	}
}

// TestFarPeerKeepsItsConnection: a live peer on a path of 1.2 s round
// trips (a relayed satellite link; real hosts, through a proxy that
// delays every byte or datagram) needs 2.4 s for a probe, negotiation
// and echo, more than the 2 s default: its connection stays. The probe's
// echo had no more than the 2 s before, and the connection was closed.
// Over TCP and QUIC.
func TestFarPeerKeepsItsConnection(t *testing.T) {
	const oneWay = 600 * time.Millisecond
	for _, tc := range []struct {
		listen string
		proxy  func(t testing.TB, target ma.Multiaddr) ma.Multiaddr
	}{
		{"/ip4/127.0.0.1/tcp/0", func(t testing.TB, target ma.Multiaddr) ma.Multiaddr {
			return netproxy.TCP(t, target, oneWay)
		}},
		{"/ip4/127.0.0.1/udp/0/quic-v1", func(t testing.TB, target ma.Multiaddr) ma.Multiaddr {
			return netproxy.NewUDP(t, target, oneWay).Addr
		}},
	} {
		t.Run(tc.listen, func(t *testing.T) {
			t.Parallel()
			a, b := newHost(t, tc.listen), newHost(t, tc.listen)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if err := a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: []ma.Multiaddr{tc.proxy(t, b.Addrs()[0])}}); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			checkedAliveAndKept(t, a, onlyConn(t, a, b.ID()))
			t.Logf("probe over 1.2 s round trips: %v", time.Since(start).Round(10*time.Millisecond))
		})
	}
}

// checkedAliveAndKept checks conn of h with a checker of the default
// timeout and wants the peer alive and the connection kept.
func checkedAliveAndKept(t *testing.T, h host.Host, conn network.Conn) {
	t.Helper()
	c := New(h)
	t.Cleanup(c.Close)
	got := make(chan Outcome, 1)
	c.Check(conn, func(o Outcome) { got <- o })
	select {
	case o := <-got:
		if o != Alive {
			t.Fatalf("outcome %v, want alive", o)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no outcome in 15 s")
	}
	if conn.IsClosed() || c.Closed() != 0 {
		t.Fatalf("the connection closed %v (checker's count %d); want it kept", conn.IsClosed(), c.Closed())
	}
}

// TestCloseEndsAProbeAtOnce: closing the checker ends a probe waiting on
// a peer that never echoes, rather than waiting out its deadline.
func TestCloseEndsAProbeAtOnce(t *testing.T) {
	a, b := newHost(t, "/ip4/127.0.0.1/tcp/0"), newHost(t, "/ip4/127.0.0.1/tcp/0")
	b.SetStreamHandler(ping.ID, func(s network.Stream) { _, _ = io.Copy(io.Discard, s) })
	if err := a.Connect(t.Context(), peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()}); err != nil {
		t.Fatal(err)
	}
	c := New(a, WithTimeout(10*time.Second))
	conn := onlyConn(t, a, b.ID())
	c.Suspect(conn)
	time.Sleep(300 * time.Millisecond) // the probe negotiated and waits for its echo
	start := time.Now()
	c.Close()
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Close took %v with a probe under way; want it to end the probe", took)
	}
	// A probe cut short by Close says nothing of the peer.
	if conn.IsClosed() || c.Closed() != 0 {
		t.Fatalf("the connection closed %v (checker's count %d) by a probe Close cut short", conn.IsClosed(), c.Closed())
	}
}

// TestRelayedConnectionKeepsTheFullTimeout: a peer whose smoothed round
// trip is short (10 ms, as a direct connection beside the circuit makes
// it) still gets the whole default timeout on its relayed connection,
// whose round trips that figure does not measure: an echo 1.5 s late
// (a slow circuit) keeps the circuit, where a timeout shortened to 1 s
// closed it. Over TCP and QUIC to the relay.
func TestRelayedConnectionKeepsTheFullTimeout(t *testing.T) {
	for _, listen := range []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"} {
		t.Run(listen, func(t *testing.T) {
			r := newHost(t, listen, libp2p.EnableRelayService(), libp2p.ForceReachabilityPublic())
			w, err := libp2p.New(libp2p.NoListenAddrs, libp2p.EnableRelay())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { w.Close() })
			w.SetStreamHandler(ping.ID, func(s network.Stream) {
				defer s.Close()
				buf := make([]byte, pingSize)
				if _, err := io.ReadFull(s, buf); err != nil {
					return
				}
				time.Sleep(1500 * time.Millisecond)
				_, _ = s.Write(buf)
			})
			if _, err := client.Reserve(t.Context(), w, peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}); err != nil {
				t.Fatal(err)
			}
			h := newHost(t, listen, libp2p.EnableRelay())
			circuit := ma.Join(r.Addrs()[0], ma.StringCast("/p2p/"+r.ID().String()+"/p2p-circuit"))
			if err := h.Connect(network.WithAllowLimitedConn(t.Context(), "test"), peer.AddrInfo{ID: w.ID(), Addrs: []ma.Multiaddr{circuit}}); err != nil {
				t.Fatal(err)
			}
			h.Peerstore().RecordLatency(w.ID(), 10*time.Millisecond)
			checkedAliveAndKept(t, h, onlyConn(t, h, w.ID()))
		})
	}
}
