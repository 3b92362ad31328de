package node

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/internal/relaytest"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

func maddrs(t *testing.T, ss ...string) []ma.Multiaddr {
	t.Helper()
	out := make([]ma.Multiaddr, 0, len(ss))
	for _, s := range ss {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func addrStrings(as []ma.Multiaddr) []string {
	out := make([]string, 0, len(as))
	for _, a := range as {
		out = append(out, a.String())
	}
	return out
}

func direct(as []ma.Multiaddr) []ma.Multiaddr {
	return slices.DeleteFunc(slices.Clone(as), relayaddr.IsCircuit)
}

// punchExchange plays one punch between the initiator i and the
// responder r as go-libp2p v0.51 does (holepuncher.go, svc.go): the
// initiator drops its relayed addresses before its filter sees them, the
// responder hands its filter all of its own; each end drops the relayed
// ones it receives before its filter sees them. It returns what each end
// dials.
func punchExchange(fi, fr *punchFilter, i, r peer.ID, iOwn, rOwn []ma.Multiaddr) (iDials, rDials []ma.Multiaddr) {
	iSent := fi.FilterLocal(r, direct(iOwn))
	rSent := fr.FilterLocal(i, rOwn)
	rDials = fr.FilterRemote(i, direct(iSent))
	iDials = fi.FilterRemote(r, direct(rSent))
	return iDials, rDials
}

// Public addresses (the filter keeps no others), never dialed: 11.0.0.0/8
// as in the NAT suite, and for IPv6 a global unicast prefix (2001:db8::/32,
// the documentation prefix, is not public).
const (
	aTCP   = "/ip4/11.3.0.1/tcp/4001"
	aQUIC  = "/ip4/11.3.0.1/udp/4001/quic-v1"
	aTCP6  = "/ip6/2a01:4f8::a/tcp/4001"
	aQUIC6 = "/ip6/2a01:4f8::a/udp/4001/quic-v1"
	bTCP   = "/ip4/11.4.0.1/tcp/4001"
	bQUIC  = "/ip4/11.4.0.1/udp/4001/quic-v1"
	bTCP6  = "/ip6/2a01:4f8::b/tcp/4001"
	bQUIC6 = "/ip6/2a01:4f8::b/udp/4001/quic-v1"
	bWT    = "/ip4/11.4.0.1/udp/4002/quic-v1/webtransport"
	// A relay's address of b's: b's libp2p hands b's filter these too.
	bRelayQUIC = "/ip4/11.1.0.1/udp/4001/quic-v1/p2p/12D3KooWMwApsJZTvFSUamaiQQW8KpqSbt2KSpDUCVRrFTLvbTSV/p2p-circuit"
	bRelayTCP  = "/ip4/11.1.0.1/tcp/4001/p2p/12D3KooWMwApsJZTvFSUamaiQQW8KpqSbt2KSpDUCVRrFTLvbTSV/p2p-circuit"
)

// Both ends of a punch dial one kind of address, the same: the first of
// QUIC/IPv4, QUIC/IPv6, TCP/IPv4, TCP/IPv6 that both sent, else all.
func TestPunchFilterBothEndsDialOneKind(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	for _, tc := range []struct {
		name   string
		a, b   []string
		aDials []string // what a dials of b's
		bDials []string // what b dials of a's
	}{
		{"both QUIC: QUIC alone", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, []string{bQUIC}, []string{aQUIC}},
		{"one end without UDP: TCP", []string{aTCP}, []string{bTCP, bQUIC}, []string{bTCP}, []string{aTCP}},
		{"the other end without UDP: TCP", []string{aTCP, aQUIC}, []string{bTCP}, []string{bTCP}, []string{aTCP}},
		{"dual stack: QUIC over IPv4 alone", []string{aTCP, aQUIC, aTCP6, aQUIC6}, []string{bQUIC6, bTCP, bQUIC, bTCP6}, []string{bQUIC}, []string{aQUIC}},
		{"IPv6 in common only", []string{aQUIC6, aTCP}, []string{bQUIC6, bQUIC}, []string{bQUIC6}, []string{aQUIC6}},
		{"nothing in common: all", []string{aQUIC}, []string{bTCP6}, []string{bTCP6}, []string{aQUIC}},
		{"a relay's QUIC address is no QUIC of b's", []string{aTCP, aQUIC}, []string{bRelayQUIC, bRelayTCP, bTCP}, []string{bTCP}, []string{aTCP}},
		{"WebTransport is not plain QUIC", []string{aTCP, aQUIC}, []string{bTCP, bWT}, []string{bTCP}, []string{aTCP}},
	} {
		// Either end may be the one that initiates.
		for _, aStarts := range []bool{true, false} {
			fa, fb := newPunchFilter(), newPunchFilter()
			var aDials, bDials []ma.Multiaddr
			if aStarts {
				aDials, bDials = punchExchange(fa, fb, pa, pb, maddrs(t, tc.a...), maddrs(t, tc.b...))
			} else {
				bDials, aDials = punchExchange(fb, fa, pb, pa, maddrs(t, tc.b...), maddrs(t, tc.a...))
			}
			if got := addrStrings(aDials); !slices.Equal(got, tc.aDials) {
				t.Errorf("%s (a starts %v): a dials %v, want %v", tc.name, aStarts, got, tc.aDials)
			}
			if got := addrStrings(bDials); !slices.Equal(got, tc.bDials) {
				t.Errorf("%s (a starts %v): b dials %v, want %v", tc.name, aStarts, got, tc.bDials)
			}
		}
	}
}

// Punches in both directions at once (each end holds a circuit the other
// dialed) interleave their calls and still agree; a CONNECT read before
// we sent any dials all.
func TestPunchFilterBothDirectionsAtOnce(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bRelayQUIC, bTCP, bQUIC)
	fa, fb := newPunchFilter(), newPunchFilter()
	if got := fa.FilterRemote(pb, direct(b)); len(got) != 2 {
		t.Errorf("before any FilterLocal, %v dialed, want all", addrStrings(got))
	}
	// a initiates to b while b initiates to a: both FilterLocal calls
	// of each end come before both FilterRemote calls.
	aSent1, bSent1 := fa.FilterLocal(pb, a), fb.FilterLocal(pa, direct(b))
	aSent2, bSent2 := fa.FilterLocal(pb, a), fb.FilterLocal(pa, b)
	for i, got := range [][]ma.Multiaddr{
		fa.FilterRemote(pb, direct(bSent1)), fa.FilterRemote(pb, direct(bSent2)),
	} {
		if s := addrStrings(got); !slices.Equal(s, []string{bQUIC}) {
			t.Errorf("a's punch %d dials %v, want QUIC alone", i+1, s)
		}
	}
	for i, got := range [][]ma.Multiaddr{fb.FilterRemote(pa, aSent1), fb.FilterRemote(pa, aSent2)} {
		if s := addrStrings(got); !slices.Equal(s, []string{aQUIC}) {
			t.Errorf("b's punch %d dials %v, want QUIC alone", i+1, s)
		}
	}
}

// clock is a settable time for the filters' notes.
type clock struct{ t time.Time }

func (c *clock) now() time.Time      { return c.t }
func (c *clock) add(d time.Duration) { c.t = c.t.Add(d) }

// filter is a filter on c's time whose host holds conns (a relayed
// connection in one direction, or none: turns are taken).
func (c *clock) filter(conns ...network.Conn) *punchFilter {
	f := newPunchFilter()
	f.now = c.now
	list := func(peer.ID) []network.Conn { return conns }
	f.conns.Store(&list)
	return f
}

// relayedConn is a relayed connection in one direction, as the filter
// reads it.
type relayedConn struct {
	network.Conn
	dir network.Direction
}

func (c relayedConn) RemoteMultiaddr() ma.Multiaddr { return ma.StringCast(bRelayTCP) }
func (c relayedConn) Stat() network.ConnStats {
	return network.ConnStats{Stats: network.Stats{Direction: c.dir}}
}
func onlyOf(as []ma.Multiaddr) []string { return addrStrings(as) }

// libp2p tries a punch up to three times: the pair tries QUIC, then TCP,
// then QUIC, so that NATs that open TCP holes and not UDP ones still
// punch; a punch long after the last starts with QUIC again. The ends
// agree whatever each saw, and an end without TCP sends QUIC at
// every try.
func TestPunchFilterTriesAlternate(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bRelayQUIC, bRelayTCP, bTCP, bQUIC)
	type try struct {
		after          time.Duration // since the try before
		aDials, bDials []string
	}
	quic, tcp := try{aDials: []string{bQUIC}, bDials: []string{aQUIC}}, try{aDials: []string{bTCP}, bDials: []string{aTCP}}
	at := func(d time.Duration, t try) try { t.after = d; return t }
	// libp2p's next try follows a failed one by its dial's 5 s (go-libp2p's
	// QUIC hole punch and TCP connect timeouts) and a relay's round trip
	// and a half: a shorter gap here than any real one.
	const next = 5 * time.Second
	for _, tc := range []struct {
		name  string
		a, b  []ma.Multiaddr
		aOnly bool // a alone noted a try with b 5 s before the first
		tries []try
	}{
		{"three tries, then a new punch", a, b, false, []try{quic, at(next, tcp), at(next, quic), at(31*time.Second, quic), at(next, tcp)}},
		{"an exchange one end alone saw", a, b, true, []try{quic, at(next, tcp), at(next, quic)}},
		{"no QUIC in common", maddrs(t, aTCP, aQUIC6), b, false, []try{tcp, at(next, tcp), at(next, tcp)}},
		{"an end without TCP", maddrs(t, aQUIC), b, false, []try{quic, at(next, quic), at(next, quic)}},
	} {
		for _, aStarts := range []bool{true, false} {
			c := &clock{t: time.Unix(1e9, 0)}
			// The initiator holds the relayed connection the other dialed.
			in, out := relayedConn{dir: network.DirInbound}, relayedConn{dir: network.DirOutbound}
			fa, fb := c.filter(out), c.filter(in)
			if aStarts {
				fa, fb = c.filter(in), c.filter(out)
			}
			if tc.aOnly {
				_ = fa.FilterLocal(pb, tc.a)
				c.add(5 * time.Second)
			}
			for i, want := range tc.tries {
				c.add(want.after)
				var aDials, bDials []ma.Multiaddr
				if aStarts {
					aDials, bDials = punchExchange(fa, fb, pa, pb, tc.a, tc.b)
				} else {
					bDials, aDials = punchExchange(fb, fa, pb, pa, tc.b, tc.a)
				}
				if got := onlyOf(aDials); !slices.Equal(got, want.aDials) {
					t.Errorf("%s (a starts %v), try %d: a dials %v, want %v", tc.name, aStarts, i+1, got, want.aDials)
				}
				if got := onlyOf(bDials); !slices.Equal(got, want.bDials) {
					t.Errorf("%s (a starts %v), try %d: b dials %v, want %v", tc.name, aStarts, i+1, got, want.bDials)
				}
			}
		}
	}
}

// A pair that punches in both directions (relayed connections both
// ways) takes no turns: exchanges of different tries can be under way
// at once, in libp2p's order (the initiator's FilterRemote a relay's
// round trip after its FilterLocal, the responder's two calls back to
// back), and both punches must pick the same kind. A filter that cannot
// tell (no host yet) takes none either.
func TestPunchFilterBothWaysTakesNoTurns(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bRelayQUIC, bTCP, bQUIC)
	both := []network.Conn{relayedConn{dir: network.DirInbound}, relayedConn{dir: network.DirOutbound}}
	noHost := func(c *clock) *punchFilter { f := newPunchFilter(); f.now = c.now; return f }
	for _, tc := range []struct {
		name  string
		build func(c *clock) *punchFilter
	}{
		{"both ways", func(c *clock) *punchFilter { return c.filter(both...) }},
		{"no host", noHost},
	} {
		for _, offset := range []time.Duration{0, 300 * time.Millisecond, 1100 * time.Millisecond, 2500 * time.Millisecond} {
			c := &clock{t: time.Unix(1e9, 0)}
			fa, fb := tc.build(c), tc.build(c)
			for try := range 3 {
				// a initiates to b; offset later, b initiates to a; the
				// relay's round trip is 3 s.
				aSent := fa.FilterLocal(pb, direct(a))
				c.add(offset)
				bSent := fb.FilterLocal(pa, direct(b))
				aSent2 := fa.FilterLocal(pb, a)
				aDials2 := fa.FilterRemote(pb, direct(bSent))
				bSent1 := fb.FilterLocal(pa, b)
				bDials1 := fb.FilterRemote(pa, aSent)
				c.add(3 * time.Second)
				aDials1 := fa.FilterRemote(pb, direct(bSent1))
				bDials2 := fb.FilterRemote(pa, aSent2)
				for i, got := range [][]ma.Multiaddr{aDials1, aDials2, bDials1, bDials2} {
					want := []string{bQUIC}
					if i >= 2 {
						want = []string{aQUIC}
					}
					if s := onlyOf(got); !slices.Equal(s, want) {
						t.Errorf("%s, offset %s, try %d, dial %d: %v, want %v", tc.name, offset, try+1, i+1, s, want)
					}
				}
				c.add(10 * time.Second)
			}
		}
	}
}

// The notes are bounded: with maxPunchNotes peers punched within
// punchForget, another is sent all and left unnoted; once they are older,
// a new one prunes them.
func TestPunchFilterNotesBounded(t *testing.T) {
	a := maddrs(t, aTCP, aQUIC)
	c := &clock{t: time.Unix(1e9, 0)}
	f := c.filter()
	for i := range maxPunchNotes {
		f.FilterLocal(peer.ID(fmt.Sprint("p", i)), a)
	}
	c.add(2 * time.Second)
	f.FilterLocal(peer.ID("p0"), a) // p0 punched again: its note the newest
	if got := onlyOf(f.FilterLocal(peer.ID("new"), a)); len(got) != 2 || len(f.tries) != maxPunchNotes {
		t.Errorf("past the bound: sent %v, %d notes; want all sent and %d notes", got, len(f.tries), maxPunchNotes)
	}
	if got := onlyOf(f.FilterRemote(peer.ID("new"), maddrs(t, bTCP, bQUIC))); !slices.Equal(got, []string{bQUIC}) {
		t.Errorf("unnoted peer dials %v, want QUIC as for all sent", got)
	}
	c.add(punchForget)
	f.FilterLocal(peer.ID("newer"), a)
	if len(f.tries) != 2 { // p0's, punchForget old exactly, and newer's
		t.Errorf("%d notes once punchForget passed, want 2", len(f.tries))
	}
}

// Within one try an end sends the same to both exchanges, also when the
// first one's CONNECT from the peer (TCP alone) came in between.
func TestPunchFilterOneTurnPerTry(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bTCP, bQUIC)
	c := &clock{t: time.Unix(1e9, 0)}
	fa, fb := c.filter(relayedConn{dir: network.DirInbound}), c.filter(relayedConn{dir: network.DirOutbound})
	punchExchange(fa, fb, pa, pb, a, b)
	c.add(10 * time.Second)
	aSent1 := fa.FilterLocal(pb, a)
	fa.FilterRemote(pb, maddrs(t, bTCP))
	c.add(300 * time.Millisecond)
	aSent2 := fa.FilterLocal(pb, a)
	for i, got := range [][]ma.Multiaddr{aSent1, aSent2} {
		if s := onlyOf(got); !slices.Equal(s, []string{aTCP}) {
			t.Errorf("exchange %d of the second try sends %v, want TCP alone", i+1, s)
		}
	}
}

// An end that comes to hold relayed connections both ways while an
// exchange is under way (here b's second try, TCP's turn, with a relay
// round trip of 3 s, and a that saw one exchange more) sends the
// other direction's exchange what it sent in that try, so that the one
// under way reads back what it sent: both ends dial the same kind.
func TestPunchFilterTurnKeptWhenBothWaysBegins(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bRelayQUIC, bTCP, bQUIC)
	c := &clock{t: time.Unix(1e9, 0)}
	aConns := []network.Conn{relayedConn{dir: network.DirOutbound}}
	bConns := []network.Conn{relayedConn{dir: network.DirInbound}}
	filter := func(conns *[]network.Conn) *punchFilter {
		f := newPunchFilter()
		f.now = c.now
		list := func(peer.ID) []network.Conn { return *conns }
		f.conns.Store(&list)
		return f
	}
	fa, fb := filter(&aConns), filter(&bConns)
	_ = fa.FilterLocal(pb, a) // an exchange b never saw
	c.add(5 * time.Second)
	punchExchange(fb, fa, pb, pa, b, a) // b's first try
	c.add(10 * time.Second)
	bSent := fb.FilterLocal(pa, direct(b)) // b's second try, TCP's turn
	aSent := fa.FilterLocal(pb, a)
	aDials := fa.FilterRemote(pb, direct(bSent))
	// b dials a through the relay: a initiates the other way.
	aConns = append(aConns, relayedConn{dir: network.DirInbound})
	bConns = append(bConns, relayedConn{dir: network.DirOutbound})
	c.add(1500 * time.Millisecond)
	aSent2 := fa.FilterLocal(pb, direct(a))
	bSent2 := fb.FilterLocal(pa, b)
	bDials2 := fb.FilterRemote(pa, aSent2)
	c.add(1500 * time.Millisecond)
	bDials := fb.FilterRemote(pa, direct(aSent))
	aDials2 := fa.FilterRemote(pb, direct(bSent2))
	for _, d := range []struct {
		name      string
		got, want []ma.Multiaddr
	}{
		{"a in b's try", aDials, maddrs(t, bTCP)}, {"b in b's try", bDials, maddrs(t, aTCP)},
		{"a in a's try", aDials2, maddrs(t, bTCP)}, {"b in a's try", bDials2, maddrs(t, aTCP)},
	} {
		if got, want := onlyOf(d.got), onlyOf(d.want); !slices.Equal(got, want) {
			t.Errorf("%s dials %v, want %v", d.name, got, want)
		}
	}
}

// Punches past a peer's budget, or past that of all peers, are refused
// (FilterRemote keeps nothing): a stranger cannot make the node dial
// without end, a message to a stream. An honest pair's punches fit.
func TestPunchFilterBudgets(t *testing.T) {
	pub := maddrs(t, bTCP, bQUIC)
	lan := maddrs(t, "/ip4/192.168.1.1/tcp/80", "/ip4/127.0.0.1/tcp/4001")
	own := maddrs(t, aTCP, aQUIC)
	// punch is one exchange with p as libp2p runs it at either end:
	// FilterLocal, then FilterRemote; it reports whether p is answered.
	punch := func(f *punchFilter, p peer.ID, addrs []ma.Multiaddr) bool {
		f.FilterLocal(p, own)
		return len(f.FilterRemote(p, addrs)) > 0
	}
	// punches makes n exchanges with p at once and counts those answered.
	punches := func(f *punchFilter, p peer.ID, n int) int {
		answered := 0
		for range n {
			if punch(f, p, pub) {
				answered++
			}
		}
		return answered
	}
	p, q := peer.ID("p"), peer.ID("q")
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, c *clock, f *punchFilter)
	}{
		{"a peer's budget, then one more each punchPeerEvery", func(t *testing.T, c *clock, f *punchFilter) {
			if n := punches(f, p, 20); n != punchesPerPeer {
				t.Errorf("%d of 20 punches at once answered, want %d", n, punchesPerPeer)
			}
			if !punch(f, q, pub) {
				t.Error("another peer was refused: its budget is its own")
			}
			c.add(punchPeerEvery)
			if n := punches(f, p, 5); n != 1 {
				t.Errorf("%d of 5 punches answered %v later, want 1", n, punchPeerEvery)
			}
			c.add(punchForget)
			if n := punches(f, p, 20); n != punchesPerPeer {
				t.Errorf("%d of 20 punches answered once the budget refilled, want %d", n, punchesPerPeer)
			}
		}},
		{"an honest pair: three tries each way, a new circuit's after a death", func(t *testing.T, c *clock, f *punchFilter) {
			for i := range 9 {
				if !punch(f, p, pub) {
					t.Fatalf("exchange %d of an honest pair refused", i+1)
				}
				c.add(3 * time.Second)
			}
		}},
		{"the budget outlives a series", func(t *testing.T, c *clock, f *punchFilter) {
			punches(f, p, punchesPerPeer)
			c.add(punchSeries + punchPeerEvery/2) // a new series: the note starts again
			if n, want := punches(f, p, 20), int((punchSeries+punchPeerEvery/2)/punchPeerEvery); n != want {
				t.Errorf("%d punches answered in the next series, want %d", n, want)
			}
		}},
		{"nothing to dial spends nothing", func(t *testing.T, c *clock, f *punchFilter) {
			for range 50 {
				if punch(f, p, lan) {
					t.Fatal("a CONNECT naming no public address was answered")
				}
			}
			if n := punches(f, p, 20); n != punchesPerPeer {
				t.Errorf("%d punches answered after refused LAN ones, want %d", n, punchesPerPeer)
			}
		}},
		{"all peers' budget", func(t *testing.T, c *clock, f *punchFilter) {
			answered := 0
			for i := range punchesAll + 10 {
				if punch(f, peer.ID(fmt.Sprint("sybil", i)), pub) {
					answered++
				}
			}
			if answered != punchesAll {
				t.Errorf("%d of %d peers' punches answered, want %d", answered, punchesAll+10, punchesAll)
			}
			if punch(f, p, pub) {
				t.Error("a new peer was answered past all peers' budget")
			}
			c.add(punchAllEvery)
			if !punch(f, p, pub) || punch(f, q, pub) {
				t.Errorf("want one punch more after %v", punchAllEvery)
			}
		}},
		{"a peer refused its own spends nothing of all peers'", func(t *testing.T, c *clock, f *punchFilter) {
			punches(f, p, punchesPerPeer+500)
			answered := 0
			for i := range punchesAll {
				if punch(f, peer.ID(fmt.Sprint("other", i)), pub) {
					answered++
				}
			}
			if want := punchesAll - punchesPerPeer; answered != want {
				t.Errorf("%d other peers answered, want %d", answered, want)
			}
		}},
		{"a punch refused by all peers' budget spends none of the peer's", func(t *testing.T, c *clock, f *punchFilter) {
			for i := range punchesAll {
				punch(f, peer.ID(fmt.Sprint("sybil", i)), pub)
			}
			if n := punches(f, p, punchesPerPeer); n != 0 {
				t.Fatalf("%d punches answered past all peers' budget", n)
			}
			c.add(punchesPerPeer * punchAllEvery) // all peers' budget: room for p's 8 again
			if n := punches(f, p, 20); n != punchesPerPeer {
				t.Errorf("%d punches answered once all peers' budget refilled, want the peer's %d", n, punchesPerPeer)
			}
		}},
		{"a note whose budget is not full again is kept", func(t *testing.T, c *clock, f *punchFilter) {
			f.FilterLocal(p, own)
			c.add(59 * time.Second) // the peer's CONNECT, read a stream's time later
			for range punchesPerPeer {
				f.FilterRemote(p, pub)
			}
			for i := range maxPunchNotes - 1 {
				f.FilterLocal(peer.ID(fmt.Sprint("noted", i)), own)
			}
			c.add(punchForget - 59*time.Second + time.Second) // p's note punchForget old, its budget not full
			f.FilterLocal(peer.ID("new"), own)
			if _, ok := f.tries[p]; !ok {
				t.Error("the note of a peer whose budget is still spent was dropped: its punches would start again from a full budget")
			}
		}},
		{"a peer without a note has all peers' budget alone", func(t *testing.T, c *clock, f *punchFilter) {
			for i := range maxPunchNotes {
				f.FilterLocal(peer.ID(fmt.Sprint("noted", i)), own)
			}
			if n := punches(f, p, punchesAll+10); n != punchesAll {
				t.Errorf("an unnoted peer got %d punches, want all peers' %d", n, punchesAll)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &clock{t: time.Unix(1e9, 0)}
			tc.run(t, c, c.filter())
		})
	}
}

// An end that knows no public TCP address of its own (every connection it
// has is QUIC) sends a guess, its QUIC address's IP with its TCP
// listener's port, so that a peer with TCP alone can punch with it; a
// pair with QUIC in common still dials QUIC alone.
func TestPunchFilterGuessesTCP(t *testing.T) {
	const (
		lanTCP  = "/ip4/10.1.0.2/tcp/4002"
		lanQUIC = "/ip4/10.1.0.2/udp/4001/quic-v1"
		guess   = "/ip4/11.3.0.1/tcp/4002" // the TCP listener's port, not QUIC's
		other   = "/ip4/11.5.0.1/udp/4001/quic-v1"
		guess2  = "/ip4/11.5.0.1/tcp/4002"
	)
	listening := func(ls ...string) func(c *clock) *punchFilter {
		return func(c *clock) *punchFilter {
			f := c.filter()
			as := maddrs(t, ls...)
			list := func() []ma.Multiaddr { return as }
			f.listens.Store(&list)
			return f
		}
	}
	tcpAndQUIC := listening("/ip4/0.0.0.0/tcp/4002", "/ip4/0.0.0.0/udp/4001/quic-v1")
	for _, tc := range []struct {
		name   string
		filter func(c *clock) *punchFilter
		own    []string // what libp2p hands FilterLocal
		want   []string // what it sends
	}{
		{"QUIC observed alone: the guess", tcpAndQUIC, []string{lanTCP, lanQUIC, aQUIC}, []string{lanTCP, lanQUIC, aQUIC, guess}},
		{"each guess after its QUIC address", tcpAndQUIC, []string{aQUIC, other, aQUIC6, bRelayTCP}, []string{aQUIC, guess, other, guess2, aQUIC6, bRelayTCP}},
		{"a loopback listener's port is not the one", listening("/ip4/127.0.0.1/tcp/5000", "/ip4/0.0.0.0/tcp/4002"), []string{aQUIC}, []string{aQUIC, guess}},
		{"QUIC over IPv6 alone: no guess", tcpAndQUIC, []string{lanTCP, aQUIC6}, []string{lanTCP, aQUIC6}},
		{"TCP over IPv6 known, not over IPv4: the guess", tcpAndQUIC, []string{aTCP6, aQUIC}, []string{aTCP6, aQUIC, guess}},
		{"TCP observed too: no guess", tcpAndQUIC, []string{lanTCP, aTCP, aQUIC}, []string{lanTCP, aTCP, aQUIC}},
		{"no public address: no guess", tcpAndQUIC, []string{lanTCP, lanQUIC}, []string{lanTCP, lanQUIC}},
		{"no TCP listener: no guess", listening("/ip4/0.0.0.0/udp/4001/quic-v1"), []string{lanQUIC, aQUIC}, []string{lanQUIC, aQUIC}},
		{"a WebSocket listener is not TCP's", listening("/ip4/0.0.0.0/tcp/4002/ws", "/ip4/0.0.0.0/udp/4001/quic-v1"), []string{aQUIC}, []string{aQUIC}},
		{"no host yet: no guess", func(c *clock) *punchFilter { return c.filter() }, []string{aQUIC}, []string{aQUIC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &clock{t: time.Unix(1e9, 0)}
			if got := onlyOf(tc.filter(c).FilterLocal(peer.ID("p"), maddrs(t, tc.own...))); !slices.Equal(got, tc.want) {
				t.Errorf("sent %v, want %v", got, tc.want)
			}
		})
	}

	// The pair: the guessing end a, QUIC and the guess; the peer b, TCP
	// alone. Both dial TCP: b the guess, a b's address. With QUIC at b
	// too, both dial QUIC.
	for _, tc := range []struct {
		name           string
		b              []string
		aDials, bDials []string
	}{
		{"peer with TCP alone", []string{bTCP}, []string{bTCP}, []string{guess}},
		{"peer with QUIC too", []string{bTCP, bQUIC}, []string{bQUIC}, []string{aQUIC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &clock{t: time.Unix(1e9, 0)}
			fa, fb := tcpAndQUIC(c), c.filter()
			aDials, bDials := punchExchange(fa, fb, "a", "b", maddrs(t, lanTCP, lanQUIC, aQUIC), maddrs(t, tc.b...))
			if got := onlyOf(aDials); !slices.Equal(got, tc.aDials) {
				t.Errorf("a dials %v, want %v", got, tc.aDials)
			}
			if got := onlyOf(bDials); !slices.Equal(got, tc.bDials) {
				t.Errorf("b dials %v, want %v", got, tc.bDials)
			}
		})
	}
}

// libp2p's Connect in a punch dials every address of the peer it holds,
// not only the punch's: within punchDialWindow of an exchange, the gate
// refuses the peer's direct addresses the exchange did not keep (of
// another kind, or others of its kind, as a stranger's identify may
// list); not a relay's, nor another peer's, nor after the window.
func TestPunchGateKeepsThePunchToItsAddresses(t *testing.T) {
	pa, pb, pc := peer.ID("a"), peer.ID("b"), peer.ID("c")
	for _, tc := range []struct {
		name    string
		a, b    []string
		peer    peer.ID
		dial    string
		later   time.Duration
		allowed bool
	}{
		{"QUIC kept: the peer's QUIC address", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bQUIC, 0, true},
		{"QUIC kept: the peer's TCP address", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bTCP, 0, false},
		{"QUIC kept: the peer's QUIC address over IPv6", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bQUIC6, 0, false},
		{"QUIC kept: the peer's relay address", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bRelayTCP, 0, true},
		{"QUIC kept: another peer's TCP address", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pc, bTCP, 0, true},
		{"QUIC kept: the peer's TCP address after the window", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bTCP, punchDialWindow + time.Second, true},
		{"TCP kept: the peer's QUIC address", []string{aTCP}, []string{bTCP, bQUIC}, pb, bQUIC, 0, false},
		{"TCP kept: the peer's TCP address", []string{aTCP}, []string{bTCP, bQUIC}, pb, bTCP, 0, true},
		{"QUIC kept: another QUIC address of the peer's (its identify's)", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, "/ip4/11.9.0.1/udp/4001/quic-v1", 0, false},
		{"QUIC kept: the peer's QUIC address with its /p2p/ part", []string{aTCP, aQUIC}, []string{bTCP, bQUIC}, pb, bQUIC + "/p2p/12D3KooWMwApsJZTvFSUamaiQQW8KpqSbt2KSpDUCVRrFTLvbTSV", 0, true},
		{"nothing in common, all kept: the peer's address", []string{aQUIC}, []string{bTCP6}, pb, bTCP6, 0, true},
		{"nothing in common, all kept: another of the peer's", []string{aQUIC}, []string{bTCP6}, pb, bTCP, 0, false},
	} {
		c := &clock{t: time.Unix(1_800_000_000, 0)}
		fa, fb := c.filter(), c.filter()
		punchExchange(fa, fb, pa, pb, maddrs(t, tc.a...), maddrs(t, tc.b...))
		c.add(tc.later)
		g := punchGate{f: fa}
		if got := g.InterceptAddrDial(tc.peer, maddrs(t, tc.dial)[0]); got != tc.allowed {
			t.Errorf("%s: dial allowed %v, want %v", tc.name, got, tc.allowed)
		}
	}
}

// The gate is the node's host's (newHost): a dial of a punch's peer's
// other kind fails at the swarm, on real hosts, and a closed swarm's
// gater still has its say.
func TestPunchGateOnAHost(t *testing.T) {
	b := loopbackHost(t)
	f := newPunchFilter()
	inner := &countingGater{}
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	a, err := newHost(hostConfig{key: key, listen: []string{"/ip4/127.0.0.1/tcp/0"}, gater: inner, filter: f})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	// A punch with b that kept a QUIC address alone.
	f.mu.Lock()
	f.gates[b.ID()] = punchGateNote{cur: []string{dialKey(ma.StringCast("/ip4/127.0.0.1/udp/4001/quic-v1"))}, until: time.Now().Add(time.Minute)}
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info := peer.AddrInfo{ID: b.ID(), Addrs: b.Addrs()} // TCP over loopback: its kind, TCP/IPv4
	if err := a.Connect(ctx, info); err == nil {
		t.Fatal("a TCP dial within a QUIC punch's window connected")
	}
	f.mu.Lock()
	delete(f.gates, b.ID())
	f.mu.Unlock()
	if err := a.Connect(ctx, info); err != nil {
		t.Fatalf("with no punch under way: %v", err)
	}
	if len(inner.seen()) == 0 {
		t.Error("the closed swarm's gater was not asked")
	}
}

// countingGater allows all and records the direct addresses of peer of
// (any peer's, if unset) it is asked to dial.
type countingGater struct {
	of    peer.ID
	mu    sync.Mutex
	addrs []string
}

func (g *countingGater) InterceptPeerDial(peer.ID) bool { return true }
func (g *countingGater) InterceptAddrDial(p peer.ID, a ma.Multiaddr) bool {
	if (g.of == "" || p == g.of) && !relayaddr.IsCircuit(a) {
		g.mu.Lock()
		g.addrs = append(g.addrs, a.String())
		g.mu.Unlock()
	}
	return true
}

func (g *countingGater) seen() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.addrs)
}

func (g *countingGater) InterceptAccept(network.ConnMultiaddrs) bool { return true }
func (g *countingGater) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (g *countingGater) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) {
	return true, 0
}

// The gate follows the try, at both ends: QUIC at the first, TCP alone
// at the TCP turn. Two exchanges of one try (both directions at once)
// that kept different kinds let either be dialed.
func TestPunchGateFollowsTheTry(t *testing.T) {
	pa, pb := peer.ID("a"), peer.ID("b")
	c := &clock{t: time.Unix(1_800_000_000, 0)}
	fa, fb := c.filter(), c.filter()
	a, b := maddrs(t, aTCP, aQUIC), maddrs(t, bTCP, bQUIC)
	check := func(what string, f *punchFilter, p peer.ID, addr string, want bool) {
		t.Helper()
		if got := (punchGate{f: f}).InterceptAddrDial(p, maddrs(t, addr)[0]); got != want {
			t.Errorf("%s: a dial to %s allowed %v, want %v", what, addr, got, want)
		}
	}
	punchExchange(fa, fb, pa, pb, a, b)
	check("the first try, a", fa, pb, bQUIC, true)
	check("the first try, a", fa, pb, bTCP, false)
	check("the first try, b", fb, pa, aQUIC, true)
	check("the first try, b", fb, pa, aTCP, false)
	c.add(5 * time.Second)
	punchExchange(fa, fb, pa, pb, a, b)
	check("the TCP turn, a", fa, pb, bTCP, true)
	check("the TCP turn, a", fa, pb, bQUIC, false)
	check("the TCP turn, b", fb, pa, aTCP, true)
	check("the TCP turn, b", fb, pa, aQUIC, false)

	c.add(time.Minute) // a new series
	punchExchange(fa, fb, pa, pb, a, b)
	check("a new series, a", fa, pb, bTCP, false)
	c.add(time.Second)
	// The other direction's exchange of the same try, whose peer sent
	// TCP alone.
	fa.FilterLocal(pb, a)
	fa.FilterRemote(pb, maddrs(t, bTCP))
	check("one try both ways, a", fa, pb, bTCP, true)
	check("one try both ways, a", fa, pb, bQUIC, true)
}

// What a stranger's identify lists: libp2p keeps the addresses a peer's
// identify gives (public ones, over a relay at a public address) and
// its Connect in a punch dials them all beside the punch's own. On real
// hosts, b's identify lists two public addresses, one of the punch's
// kind; a's punch-style
// Connect within an exchange's window reaches a closed swarm's gater
// (counted) with the punch's address alone.
func TestPunchGateStopsIdentifyAddresses(t *testing.T) {
	// One of the punch's kind, one of another.
	listed := []ma.Multiaddr{ma.StringCast("/ip4/11.9.250.1/udp/4001/quic-v1"), ma.StringCast("/ip4/11.9.250.2/tcp/4001")}
	b, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.AddrsFactory(func([]ma.Multiaddr) []ma.Multiaddr { return listed }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	f := newPunchFilter()
	inner := &countingGater{of: b.ID()}
	a, err := newHost(hostConfig{key: key, listen: []string{"/ip4/127.0.0.1/tcp/0"}, gater: inner, filter: f})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	r := relaytest.New(t)
	relaytest.Reserve(t, b, r)
	relaytest.Dial(t, a, b, r)
	holds := func() bool {
		as := a.Peerstore().Addrs(b.ID())
		return slices.ContainsFunc(as, listed[0].Equal) && slices.ContainsFunc(as, listed[1].Equal)
	}
	for deadline := time.Now().Add(5 * time.Second); !holds(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a holds %v for b, want what b's identify listed", a.Peerstore().Addrs(b.ID()))
		}
	}
	punch := ma.StringCast("/ip4/11.4.0.1/udp/4001/quic-v1")
	f.mu.Lock()
	f.gates[b.ID()] = punchGateNote{cur: []string{dialKey(punch)}, until: time.Now().Add(time.Minute)}
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second) // the gate is asked at once
	defer cancel()
	ctx = network.WithSimultaneousConnect(network.WithForceDirectDial(ctx, "hole-punching"), true, "hole-punching")
	_ = a.Connect(ctx, peer.AddrInfo{ID: b.ID(), Addrs: []ma.Multiaddr{punch}}) // nobody at the punch's address
	if got := inner.seen(); !slices.Equal(got, []string{punch.String()}) {
		t.Fatalf("the punch dialed %v, want the punch's address alone", got)
	}
}

// The gate's notes are bounded: a try's two exchanges both ways let both
// through, not a chain of them; a peer's note lives punchDialWindow; when
// the notes are all in use a punch is refused rather than left ungated;
// a DNS name is no punch address (it would be resolved past the bound).
func TestPunchGateNotesBounded(t *testing.T) {
	pb := peer.ID("b")
	c := &clock{t: time.Unix(1_800_000_000, 0)}
	f := c.filter()
	a := maddrs(t, aTCP, aQUIC)
	// A chain of exchanges under punchSameTry apart, each naming other
	// addresses: the last two's pass, the first's not.
	for i := range 3 {
		f.FilterLocal(pb, a)
		f.FilterRemote(pb, maddrs(t, fmt.Sprintf("/ip4/11.4.0.%d/udp/4001/quic-v1", 1+i)))
		c.add(time.Second)
	}
	for i, want := range []bool{false, true, true} {
		if got := f.allowsDial(pb, maddrs(t, fmt.Sprintf("/ip4/11.4.0.%d/udp/4001/quic-v1", 1+i))[0]); got != want {
			t.Errorf("exchange %d's address allowed %v, want %v", i+1, got, want)
		}
	}
	// Every note in use: a new peer's punch is refused.
	for i := range maxPunchNotes - 1 {
		f.gates[peer.ID(fmt.Sprint("p", i))] = punchGateNote{until: c.now().Add(time.Minute)}
	}
	f.FilterLocal("new", a)
	if got := f.FilterRemote("new", maddrs(t, bQUIC)); got != nil {
		t.Errorf("with every gate note in use, the punch dials %v, want it refused", addrStrings(got))
	}
	c.add(time.Minute + time.Second) // the notes' windows over
	f.FilterLocal("new", a)
	if got := f.FilterRemote("new", maddrs(t, bQUIC)); len(got) != 1 {
		t.Errorf("once the notes' windows passed, the punch dials %v, want %s", addrStrings(got), bQUIC)
	}
	if got := punchable(maddrs(t, "/dns4/example.com/tcp/4001", bTCP)); len(got) != 1 || got[0].String() != bTCP {
		t.Errorf("punchable kept %v, want the IP address alone", addrStrings(got))
	}
}
