package node

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/holepunch"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/mtor-swarm/mtor/node/internal/relaytest"
	"github.com/mtor-swarm/mtor/node/punchtest"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// The peer's addresses a punch dials are public ones, at most
// maxPunchAddrs, whatever the peer sent.
func TestPunchFilterKeepsPublicAddressesBounded(t *testing.T) {
	many := make([]string, 0, 100)
	for i := range 100 {
		many = append(many, fmt.Sprintf("/ip4/11.4.%d.1/udp/4001/quic-v1", i))
	}
	cases := []struct {
		name string
		in   []string
		want []string
	}{
		{"LAN, loopback, link-local, unique-local and documentation addresses",
			[]string{"/ip4/192.168.1.20/tcp/22", "/ip4/10.0.0.1/udp/4001/quic-v1", "/ip4/127.0.0.1/tcp/5050",
				"/ip4/169.254.1.1/tcp/80", "/ip6/fd00::1/tcp/4001", "/ip6/::1/tcp/4001", "/ip6/2001:db8::1/tcp/4001",
				"/ip4/100.64.0.1/tcp/4001"},
			nil},
		{"public ones among them", []string{"/ip4/192.168.1.20/tcp/22", bQUIC, "/ip4/127.0.0.1/tcp/5050", bTCP},
			[]string{bQUIC, bTCP}},
		{"a hundred public ones", many, many[:maxPunchAddrs]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := addrStrings(newPunchFilter().FilterRemote(peer.ID("b"), maddrs(t, tc.in...)))
			if !slices.Equal(got, tc.want) && (len(got) != 0 || len(tc.want) != 0) {
				t.Fatalf("dials %q, want %q", got, tc.want)
			}
		})
	}
}

// loopbackOnly refuses every dial but to loopback addresses (relayed ones
// through a relay on loopback included).
type loopbackOnly struct{}

func (loopbackOnly) InterceptPeerDial(peer.ID) bool                   { return true }
func (loopbackOnly) InterceptAddrDial(_ peer.ID, a ma.Multiaddr) bool { return manet.IsIPLoopback(a) }
func (loopbackOnly) InterceptAccept(network.ConnMultiaddrs) bool      { return true }
func (loopbackOnly) InterceptSecured(network.Direction, peer.ID, network.ConnMultiaddrs) bool {
	return true
}
func (loopbackOnly) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }

// relayedOnly is loopbackOnly that takes no direct connection from peer
// p: p reaches it through a relay alone, as a peer behind NAT.
type relayedOnly struct {
	loopbackOnly
	p peer.ID
}

func (g relayedOnly) InterceptSecured(_ network.Direction, p peer.ID, a network.ConnMultiaddrs) bool {
	return p != g.p || relayaddr.IsCircuit(a.RemoteMultiaddr())
}

// punchStarts records the addresses each hole punch of a host dials.
type punchStarts struct {
	mu    sync.Mutex
	addrs [][]string
}

func (p *punchStarts) Trace(evt *holepunch.Event) {
	if e, ok := evt.Evt.(*holepunch.StartHolePunchEvt); ok {
		p.mu.Lock()
		p.addrs = append(p.addrs, e.RemoteAddrs)
		p.mu.Unlock()
	}
}

func (p *punchStarts) all() [][]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.addrs)
}

// hostileTarget is a node with hole punching and mtor's filter, and a
// public address announced so that libp2p's service serves punches
// (loopback is not public), with a record of the punches it starts. It
// dials nothing but loopback: the public addresses here are never
// reached.
func hostileTarget(t *testing.T) (host.Host, *punchStarts) {
	t.Helper()
	starts := &punchStarts{}
	announced := ma.StringCast("/ip4/11.9.9.9/tcp/4001")
	node, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ConnectionGater(loopbackOnly{}),
		libp2p.AddrsFactory(func(as []ma.Multiaddr) []ma.Multiaddr { return append(as, announced) }),
		libp2p.EnableHolePunching(holepunch.WithAddrFilter(newPunchFilter()), holepunch.WithTracer(starts)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	for deadline := time.Now().Add(10 * time.Second); !slices.Contains(node.Mux().Protocols(), holepunch.Protocol); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the node's hole-punch service never served punches")
		}
	}
	return node, starts
}

// newStranger is a peer with a reservation on relay r, which node dials
// through r: the stranger may send node hole-punch messages. It takes no
// direct connection from the node (the node's punch would otherwise
// reach the stranger's loopback listener, and the next CONNECT come on
// that connection, which libp2p refuses).
func newStranger(t *testing.T, node, r host.Host) host.Host {
	t.Helper()
	stranger, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ConnectionGater(relayedOnly{p: node.ID()}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stranger.Close() })
	relaytest.Reserve(t, stranger, r)
	relaytest.Dial(t, node, stranger, r)
	return stranger
}

// TestHostileHolePunchConnect: a stranger that a node dialed through a
// relay answers with hole-punch CONNECT messages of its own making, as
// go-libp2p's responder takes them from any peer on a circuit it dialed.
// One names a hundred addresses of the node's LAN (here loopback: a
// listener that counts who comes): the node refuses the punch and dials
// none. One names a hundred public addresses: the node punches to the
// first maxPunchAddrs alone. Before the filter kept public addresses
// alone, the first made the node connect to the listener. Many more, a
// stream each, are answered up to the peer's punch budget alone.
func TestHostileHolePunchConnect(t *testing.T) {
	lan, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lan.Close() })
	var came atomic.Int64
	go func() {
		for {
			c, err := lan.Accept()
			if err != nil {
				return
			}
			came.Add(1)
			c.Close()
		}
	}()

	node, starts := hostileTarget(t)
	stranger := newStranger(t, node, relaytest.New(t))

	// connect sends CONNECT with addrs on a new hole-punch stream to the
	// node, over the circuit, and reports whether the node answered
	// (then it is sent SYNC, and it dials what its filter kept). A stream
	// refused for libp2p's limit of 2 at a time is sent again.
	connect := func(addrs []ma.Multiaddr) bool {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		return punchtest.ConnectAgain(ctx, stranger, node.ID(), punchtest.ConnectMsg(addrs...), 10*time.Second)
	}
	lanAddr, err := manet.FromNetAddr(lan.Addr())
	if err != nil {
		t.Fatal(err)
	}
	local := make([]ma.Multiaddr, 100)
	for i := range local {
		local[i] = lanAddr
	}
	if connect(local) {
		t.Error("the node answered a CONNECT naming only LAN addresses, want it refused")
	}
	public := make([]ma.Multiaddr, 100)
	for i := range public {
		public[i] = ma.StringCast(fmt.Sprintf("/ip4/11.5.%d.1/tcp/4001", i))
	}
	spent := time.Now() // the peer's budget refills from here
	if !connect(public) {
		t.Fatal("the node refused a CONNECT naming public addresses: the test reaches no punch")
	}
	var punched [][]string
	for deadline := time.Now().Add(5 * time.Second); len(punched) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no hole punch started after the public CONNECT")
		}
		punched = starts.all()
	}
	time.Sleep(500 * time.Millisecond) // time for a dial of the listener, had there been one
	if n := came.Load(); n != 0 {
		t.Errorf("the LAN listener saw %d connections from the node, want none", n)
	}
	if len(punched) != 1 || !slices.Equal(punched[0], addrStrings(public[:maxPunchAddrs])) {
		t.Errorf("punches dialed %v, want one, to the first %d public addresses", punched, maxPunchAddrs)
	}

	// A flood of them, a stream each: the node answers what is left of
	// the peer's budget and refuses the rest, dialing nothing for them.
	const flood = 3 * punchesPerPeer
	answered := 0
	for range flood {
		if connect(public) {
			answered++
		}
	}
	// One more each punchPeerEvery since the budget was first spent (none
	// on a quick run).
	refill := int(time.Since(spent) / punchPeerEvery)
	if want := punchesPerPeer - 1; answered < want || answered > want+refill {
		t.Errorf("the node answered %d of %d CONNECTs sent at once, want %d (the budget's %d less the one above, %d refilled)", answered, flood, want, punchesPerPeer, refill)
	}
	// Every answered CONNECT's punch starts (a stream ends only with its
	// punch: libp2p's limit above); then none more.
	for deadline := time.Now().Add(10 * time.Second); len(starts.all()) < 1+answered && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(starts.all()); n != 1+answered {
		t.Errorf("%d punches started, want one per CONNECT answered (%d)", n, 1+answered)
	}
}

// TestHostilePunchesOfManyPeers: strangers enough that their own budgets
// together pass the budget of all peers each send as many CONNECTs as
// their own budget allows, all at once. The node answers the budget of
// all (and what refills of it meanwhile), not the sum of theirs, and
// starts a punch for each answer alone.
func TestHostilePunchesOfManyPeers(t *testing.T) {
	const strangers, perRelay = 24, 8 // a relay reserves for 8 peers of an IP address
	if strangers*punchesPerPeer <= punchesAll {
		t.Fatalf("%d strangers' budgets of %d are within the budget of all, %d: the test reaches no limit", strangers, punchesPerPeer, punchesAll)
	}
	node, starts := hostileTarget(t)
	var r host.Host
	peers := make([]host.Host, strangers)
	for i := range peers {
		if i%perRelay == 0 {
			r = relaytest.New(t)
		}
		peers[i] = newStranger(t, node, r)
	}
	public := make([]ma.Multiaddr, maxPunchAddrs)
	for i := range public {
		public[i] = ma.StringCast(fmt.Sprintf("/ip4/11.6.%d.1/tcp/4001", i))
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var answered atomic.Int64
	var wg sync.WaitGroup
	spent := time.Now() // the budget of all refills from here
	for _, p := range peers {
		wg.Go(func() {
			for range punchesPerPeer {
				if punchtest.ConnectAgain(ctx, p, node.ID(), punchtest.ConnectMsg(public...), 10*time.Second) {
					answered.Add(1)
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(spent)
	refill := int64(took / punchAllEvery)
	t.Logf("the node answered %d of %d CONNECTs from %d peers in %s", answered.Load(), strangers*punchesPerPeer, strangers, took.Round(time.Millisecond))
	if n := answered.Load(); n < punchesAll || n > punchesAll+refill {
		t.Errorf("the node answered %d of %d CONNECTs from %d peers in %s, want %d (the budget of all) and at most %d refilled",
			n, strangers*punchesPerPeer, strangers, took.Round(time.Millisecond), punchesAll, refill)
	}
	for deadline := time.Now().Add(10 * time.Second); int64(len(starts.all())) < answered.Load() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(starts.all()); int64(n) != answered.Load() {
		t.Errorf("%d punches started, want one per CONNECT answered (%d)", n, answered.Load())
	}
}
