package dupconn

import (
	"context"
	"encoding/json"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/protocol/identify"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/liveness"
)

const (
	loopTCP  = "/ip4/127.0.0.1/tcp/0"
	loopQUIC = "/ip4/127.0.0.1/udp/0/quic-v1"
	queryID  = protocol.ID("/dupconn-test/query/1")
)

func newHost(t *testing.T, key crypto.PrivKey) host.Host {
	t.Helper()
	h, err := libp2p.New(libp2p.Identity(key), libp2p.ListenAddrStrings(loopTCP, loopQUIC))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// keys returns two keys, the first with the lower peer ID.
func keys(t *testing.T) (lo, hi crypto.PrivKey) {
	t.Helper()
	var ks [2]crypto.PrivKey
	var ids [2]peer.ID
	for i := range ks {
		k, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		if ids[i], err = peer.IDFromPrivateKey(k); err != nil {
			t.Fatal(err)
		}
		ks[i] = k
	}
	if ids[0] > ids[1] {
		return ks[1], ks[0]
	}
	return ks[0], ks[1]
}

// addrOf is h's listen address of one transport.
func addrOf(t *testing.T, h host.Host, proto int) ma.Multiaddr {
	t.Helper()
	for _, a := range h.Addrs() {
		if _, err := a.ValueForProtocol(proto); err == nil {
			return a
		}
	}
	t.Fatalf("%s has no address with protocol %d: %v", h.ID(), proto, h.Addrs())
	return nil
}

// twice gives a two connections to one peer, deterministically: two hosts
// b1 and b2 hold the same key, so a sees one peer. a dials b1 over QUIC,
// then b2 dials a over TCP.
func twice(t *testing.T, a host.Host, bKey crypto.PrivKey) (b1, b2 host.Host) {
	t.Helper()
	b1, b2 = newHost(t, bKey), newHost(t, bKey)
	if err := a.Connect(t.Context(), peer.AddrInfo{ID: b1.ID(), Addrs: []ma.Multiaddr{addrOf(t, b1, ma.P_QUIC_V1)}}); err != nil {
		t.Fatal(err)
	}
	if err := b2.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{addrOf(t, a, ma.P_TCP)}}); err != nil {
		t.Fatal(err)
	}
	if n := len(a.Network().ConnsToPeer(b1.ID())); n != 2 {
		t.Fatalf("%d connections to the peer, want 2", n)
	}
	return b1, b2
}

// transports lists the transports of h's connections to p, sorted.
func transports(h host.Host, p peer.ID) []string {
	var out []string
	for _, c := range h.Network().ConnsToPeer(p) {
		out = append(out, c.ConnState().Transport)
	}
	slices.Sort(out)
	return out
}

// sweepUntil sweeps until want connections were closed in all, for up to
// five seconds (the far end's stream close takes a moment to arrive).
func sweepUntil(t *testing.T, p *Pruner, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for got := 0; ; {
		got += p.Sweep(t.Context())
		if got == want {
			return
		}
		if got > want || time.Now().After(deadline) {
			t.Fatalf("closed %d connections, want %d", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// echo serves queryID on h: it echoes until the stream ends, a query
// in flight for as long as the test keeps it open.
func echo(h host.Host) {
	h.SetStreamHandler(queryID, func(s network.Stream) {
		defer s.Close()
		_, _ = io.Copy(s, s)
	})
}

// query opens a query stream from h to p and waits for its echo.
func query(t *testing.T, h host.Host, p peer.ID) network.Stream {
	t.Helper()
	s, err := h.NewStream(t.Context(), p, queryID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Reset() })
	roundTrip(t, s, "q")
	return s
}

func roundTrip(t *testing.T, s network.Stream, msg string) {
	t.Helper()
	_ = s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo %q, %v; want %q", buf, err, msg)
	}
}

// TestSweepClosesTheIdleDuplicate: the lower peer ID's end keeps the
// connection a query is on, else the QUIC one, and closes the other; the
// query goes on.
func TestSweepClosesTheIdleDuplicate(t *testing.T) {
	cases := []struct {
		name    string
		queryOn int // 0: none, 1: the QUIC connection, 2: the TCP one
		left    string
	}{
		{name: "both idle", left: "quic-v1"},
		{name: "query on QUIC", queryOn: 1, left: "quic-v1"},
		{name: "query on TCP", queryOn: 2, left: "tcp"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi := keys(t)
			a := newHost(t, lo)
			echo(a)
			b1, b2 := twice(t, a, hi)
			var s network.Stream
			switch tc.queryOn {
			case 1:
				s = query(t, b1, a.ID())
			case 2:
				s = query(t, b2, a.ID())
			}
			pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
			sweepUntil(t, pr, 1)
			if got := transports(a, b1.ID()); !slices.Equal(got, []string{tc.left}) {
				t.Fatalf("transports %v after the sweep, want [%s]", got, tc.left)
			}
			if s != nil {
				roundTrip(t, s, "more")
			}
			// The far end of the closed one sees it closed too.
			closedEnd := b2
			if tc.left == "tcp" {
				closedEnd = b1
			}
			deadline := time.Now().Add(5 * time.Second)
			for len(closedEnd.Network().ConnsToPeer(a.ID())) != 0 {
				if time.Now().After(deadline) {
					t.Fatal("the closed connection is still open at its far end")
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// TestSweepLeavesDuplicates: the cases where both connections stay.
func TestSweepLeavesDuplicates(t *testing.T) {
	cases := []struct {
		name   string
		higher bool // a holds the higher peer ID
		silent bool // the kept connection's peer no longer answers pings
		grace  time.Duration
		busy   bool // a query on each connection
	}{
		{name: "the other end decides", higher: true},
		{name: "kept connection silent", silent: true},
		{name: "younger than the grace", grace: time.Hour},
		{name: "a query on each", busy: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi := keys(t)
			if tc.higher {
				lo, hi = hi, lo
			}
			a := newHost(t, lo)
			echo(a)
			b1, b2 := twice(t, a, hi)
			if tc.busy {
				query(t, b1, a.ID())
				query(t, b2, a.ID())
			}
			if tc.silent {
				// b1, on the QUIC connection that would be kept, stops
				// answering pings, as a frozen process does.
				b1.RemoveStreamHandler(ping.ID)
			}
			pr := New(a, liveness.Probe, WithGrace(tc.grace), WithExpendable(ping.ID, identify.ID, identify.IDPush))
			for range 3 {
				if n := pr.Sweep(t.Context()); n != 0 {
					t.Fatalf("closed %d connections, want 0", n)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if got := transports(a, b1.ID()); len(got) != 2 {
				t.Fatalf("transports %v, want both kept", got)
			}
		})
	}
}

// TestSweepKeepsTheNewerOfOneTransport: of two TCP connections the newer
// stays, as a restarted peer is on its newest.
func TestSweepKeepsTheNewerOfOneTransport(t *testing.T) {
	lo, hi := keys(t)
	a := newHost(t, lo)
	tcpA := peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{addrOf(t, a, ma.P_TCP)}}
	older, newer := newHost(t, hi), newHost(t, hi)
	if err := older.Connect(t.Context(), tcpA); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // distinct opening times
	if err := newer.Connect(t.Context(), tcpA); err != nil {
		t.Fatal(err)
	}
	pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
	sweepUntil(t, pr, 1)
	conns := a.Network().ConnsToPeer(newer.ID())
	if len(conns) != 1 {
		t.Fatalf("%d connections left, want 1", len(conns))
	}
	if len(older.Network().ConnsToPeer(a.ID())) != 0 && len(newer.Network().ConnsToPeer(a.ID())) == 0 {
		t.Fatal("the newer connection was closed, the older kept")
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(older.Network().ConnsToPeer(a.ID())) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the older connection is still open at its far end")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(newer.Network().ConnsToPeer(a.ID())) != 1 {
		t.Fatal("the newer connection is gone")
	}
}

// raced connects a and b both ways at once, over QUIC one way and TCP the
// other, until they hold two connections (both dials in flight before
// either lands; a few tries at most on loopback).
func raced(t *testing.T, a, b host.Host) {
	t.Helper()
	for try := 0; try < 20; try++ {
		start := make(chan struct{})
		errs := make(chan error, 2)
		go func() {
			<-start
			errs <- a.Connect(t.Context(), peer.AddrInfo{ID: b.ID(), Addrs: []ma.Multiaddr{addrOf(t, b, ma.P_QUIC_V1)}})
		}()
		go func() {
			<-start
			errs <- b.Connect(t.Context(), peer.AddrInfo{ID: a.ID(), Addrs: []ma.Multiaddr{addrOf(t, a, ma.P_TCP)}})
		}()
		close(start)
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(100 * time.Millisecond)
		if len(a.Network().ConnsToPeer(b.ID())) == 2 && len(b.Network().ConnsToPeer(a.ID())) == 2 {
			return
		}
		_ = a.Network().ClosePeer(b.ID())
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("no duplicate connection in 20 simultaneous dials")
}

// TestQueryOpenedDuringThePingKeepsItsConnection: the sweep looks at the
// streams again after the ping; a query that opened on the connection
// meanwhile keeps it open.
func TestQueryOpenedDuringThePingKeepsItsConnection(t *testing.T) {
	lo, hi := keys(t)
	a := newHost(t, lo)
	echo(a)
	b1, b2 := twice(t, a, hi)
	var s network.Stream
	probe := func(ctx context.Context, c network.Conn) error {
		s = query(t, b2, a.ID()) // b2's one connection: the TCP one, not kept
		return liveness.Probe(ctx, c)
	}
	pr := New(a, probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
	if n := pr.Sweep(t.Context()); n != 0 {
		t.Fatalf("closed %d connections, want 0", n)
	}
	if got := transports(a, b1.ID()); len(got) != 2 {
		t.Fatalf("transports %v, want both kept", got)
	}
	roundTrip(t, s, "more")
}

// TestSweepTellsWhyDuplicatesStay: a sweep that leaves a peer's two
// connections (a query on each) says so at debug level, with each
// connection's transport and the streams that hold it.
func TestSweepTellsWhyDuplicatesStay(t *testing.T) {
	if err := logging.SetLogLevel("mtor/dupconn", "debug"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = logging.SetLogLevel("mtor/dupconn", "error") })
	pipe := logging.NewPipeReader(logging.PipeFormat(logging.JSONOutput), logging.PipeLevel(logging.LevelDebug))
	t.Cleanup(func() { pipe.Close() })
	lines := make(chan map[string]any, 64)
	go func() {
		dec := json.NewDecoder(pipe)
		for {
			var m map[string]any
			if dec.Decode(&m) != nil {
				return
			}
			select {
			case lines <- m:
			default:
			}
		}
	}()

	lo, hi := keys(t)
	a := newHost(t, lo)
	echo(a)
	b1, b2 := twice(t, a, hi)
	query(t, b1, a.ID())
	query(t, b2, a.ID())
	pr := New(a, liveness.Probe, WithGrace(0), WithExpendable(ping.ID, identify.ID, identify.IDPush))
	if n := pr.Sweep(t.Context()); n != 0 {
		t.Fatalf("closed %d connections, want 0", n)
	}
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-lines:
			if m["msg"] != "redundant connections kept: each carries streams that would break" {
				continue
			}
			conns, _ := m["conns"].([]any)
			if m["peer"] != b1.ID().String() || len(conns) != 2 {
				t.Fatalf("log line %v, want peer %s and two connections", m, b1.ID())
			}
			for _, c := range conns {
				if s, _ := c.(string); !strings.Contains(s, string(queryID)) {
					t.Fatalf("connection %q does not name the query stream that holds it", c)
				}
			}
			return
		case <-deadline:
			t.Fatal("no debug line for the connections left")
		}
	}
}
