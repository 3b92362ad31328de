package node_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/multiformats/go-multihash"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

const closedSwarm = "closed"

// closedNet is a closed swarm on loopback: its owner's key and the owner's
// node, which every other node joins through (and which relays).
type closedNet struct {
	t     *testing.T
	owner *membership.Owner
	boot  *node.Node
}

func newClosedNet(t *testing.T, bootOpts ...membership.Option) *closedNet {
	t.Helper()
	ok, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	owner, err := membership.NewOwner(ok, closedSwarm)
	if err != nil {
		t.Fatal(err)
	}
	c := &closedNet{t: t, owner: owner}
	c.boot = c.start(nil, "", append([]membership.Option{membership.WithOwner(owner)}, bootOpts...)...)
	return c
}

// start runs a node of the closed swarm with membership options mopts;
// members nil starts an ordinary open node of the same swarm name.
func (c *closedNet) start(bs []backend.Backend, label string, mopts ...membership.Option) *node.Node {
	c.t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		c.t.Fatal(err)
	}
	return c.startKeyed(key, bs, true, mopts...)
}

func (c *closedNet) startKeyed(key crypto.PrivKey, bs []backend.Backend, closed bool, mopts ...membership.Option) *node.Node {
	c.t.Helper()
	opts := []node.Option{
		node.WithIdentity(key), node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"), node.WithMDNS(false),
		node.WithSwarm(closedSwarm), node.WithAnnounceInterval(200 * time.Millisecond),
		node.WithGracePeriod(time.Second), node.WithBackends(bs...),
	}
	if c.boot == nil {
		opts = append(opts, node.WithRelayService(true))
	} else {
		opts = append(opts, node.WithJoin(c.boot.JoinLine()))
	}
	if closed {
		m, err := membership.New(closedSwarm, c.owner.ID(), append([]membership.Option{membership.WithGrace(2 * time.Minute)}, mopts...)...)
		if err != nil {
			c.t.Fatal(err)
		}
		opts = append(opts, node.WithMembership(m))
	}
	n, err := node.New(context.Background(), opts...)
	if err != nil {
		c.t.Fatalf("start node: %v", err)
	}
	c.t.Cleanup(func() { n.Close() })
	return n
}

// member starts a node with a certificate for its peer ID, granting roles
// (none: every role).
func (c *closedNet) member(bs []backend.Backend, roles ...string) *node.Node {
	c.t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		c.t.Fatal(err)
	}
	id, _ := peer.IDFromPrivateKey(key)
	cert, err := c.owner.Cert(id, roles, time.Hour, "")
	if err != nil {
		c.t.Fatal(err)
	}
	return c.startKeyed(key, bs, true, membership.WithCert(cert.Encoded))
}

func waitUntil(t *testing.T, timeout time.Duration, what string, f func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !f() {
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func inTable(n *node.Node, p peer.ID) bool {
	_, ok := n.Discovery().Table().Get(p)
	return ok
}

// queryStream sends one chat request on a raw query stream from n to p
// and reads the first event back.
func queryStream(ctx context.Context, n *node.Node, p peer.ID) error {
	s, err := n.Host().NewStream(ctx, p, protocol.QueryProtocol(closedSwarm))
	if err != nil {
		return err
	}
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(20 * time.Second))
	if err := protocol.WriteFrame(s, chat("demo", "hello")); err != nil {
		return err
	}
	var ev pb.Event
	return protocol.NewFrameReader(s, protocol.MaxEventFrame).Read(&ev)
}

// A closed swarm gives nothing to a peer that is not a member: an open
// node of the same swarm name and a node whose certificate another key
// signed are refused query streams and relay reservations, their
// announcements stay out of every member's table, and the provider
// record one of them puts in the DHT is ignored. Members (one with a
// certificate for its ID, one that redeemed an open invite) are served.
func TestClosedSwarmRefusesNonMembers(t *testing.T) {
	c := newClosedNet(t)
	worker := c.member([]backend.Backend{demo.New("member-worker")})
	inv, err := c.owner.Invite(nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	invited := c.start(nil, "", membership.WithInvite(inv.Encoded))
	outsider := c.startKeyed(mustKey(t), []backend.Backend{demo.New("outsider")}, false)
	forger, _ := membership.NewOwner(mustKey(t), closedSwarm)
	fkey := mustKey(t)
	fid, _ := peer.IDFromPrivateKey(fkey)
	fcert, _ := forger.Cert(fid, nil, time.Hour, "")
	forged := membership.Verifier{Swarm: closedSwarm, Owner: forger.ID()}
	if _, err := forged.Verify(fcert.Encoded, membership.KindCert); err != nil {
		t.Fatal(err)
	}
	// The forger's node believes in its own owner: to our swarm it
	// presents a certificate our owner never signed.
	fm, err := membership.New(closedSwarm, forger.ID(), membership.WithCert(fcert.Encoded))
	if err != nil {
		t.Fatal(err)
	}
	forgerNode, err := node.New(context.Background(), node.WithIdentity(fkey), node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"),
		node.WithMDNS(false), node.WithSwarm(closedSwarm), node.WithAnnounceInterval(200*time.Millisecond),
		node.WithBackends(demo.New("forger")), node.WithJoin(c.boot.JoinLine()), node.WithMembership(fm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { forgerNode.Close() })

	members := []*node.Node{c.boot, worker, invited}
	took := waitUntil(t, 30*time.Second, "members see the member worker", func() bool {
		return inTable(c.boot, worker.ID()) && inTable(invited, worker.ID())
	})
	t.Logf("members converged in %s", took.Round(time.Millisecond))
	if _, ok := invited.Membership().Self(); !ok {
		t.Fatal("the invited node has no certificate after redeeming its invite")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	text, res, err := ask(ctx, invited, chat("demo", "hello"))
	if err != nil || text == "" || res.Peer != worker.ID() {
		t.Fatalf("member query: %q from %v, %v", text, res, err)
	}

	// DHT: the member worker and the outsider both put a provider record.
	step := time.Now()
	if err := worker.Discovery().Provide(ctx, "secret"); err != nil {
		t.Fatalf("member provide: %v", err)
	}
	if err := outsider.Discovery().Provide(ctx, "secret"); err != nil {
		t.Fatalf("outsider provide: %v", err)
	}
	// The outsider's record is in the DHT: a raw lookup finds it...
	mh, err := multihash.Sum([]byte(protocol.ModelKey(closedSwarm, "secret")), multihash.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	key := cid.NewCidV1(cid.Raw, mh)
	waitUntil(t, 30*time.Second, "the outsider's provider record found by a raw DHT lookup", func() bool {
		var raw []peer.AddrInfo
		lctx, lcancel := context.WithTimeout(ctx, 5*time.Second)
		defer lcancel()
		for ai := range invited.Discovery().DHT().FindProvidersAsync(lctx, key, 10) {
			raw = append(raw, ai)
		}
		return hasPeer(raw, outsider.ID()) && hasPeer(raw, worker.ID())
	})
	// ...and discovery ignores it.
	ais, err := invited.Discovery().FindProviders(ctx, "secret", 10)
	if err != nil {
		t.Fatalf("find providers: %v", err)
	}
	if !hasPeer(ais, worker.ID()) || hasPeer(ais, outsider.ID()) {
		t.Errorf("providers = %v: want the member worker %s and not the outsider %s", ais, worker.ID(), outsider.ID())
	}
	t.Logf("DHT provide and lookup took %s", time.Since(step).Round(time.Millisecond))

	// Give gossip time to carry the strangers' announcements, if it would.
	time.Sleep(3 * time.Second)
	for _, stranger := range []*node.Node{outsider, forgerNode} {
		for _, m := range members {
			if inTable(m, stranger.ID()) {
				t.Errorf("member %s has the non-member %s in its table", m.ID().ShortString(), stranger.ID().ShortString())
			}
			if m.Membership().IsMember(stranger.ID()) {
				t.Errorf("member %s counts %s as a member", m.ID().ShortString(), stranger.ID().ShortString())
			}
		}
		for _, m := range members {
			if inTable(stranger, m.ID()) {
				t.Errorf("the non-member %s received the announcement of member %s", stranger.ID().ShortString(), m.ID().ShortString())
			}
		}
		if stranger.Host().Network().Connectedness(c.boot.ID()) != network.Connected {
			t.Errorf("%s is not connected to the owner's node: the refusals below prove nothing", stranger.ID().ShortString())
		}
		step := time.Now()
		if err := queryStream(ctx, stranger, worker.ID()); err == nil {
			t.Errorf("the member worker answered a query stream of the non-member %s", stranger.ID().ShortString())
		}
		t.Logf("query stream of %s refused after %s", stranger.ID().ShortString(), time.Since(step).Round(time.Millisecond))
		ai := peer.AddrInfo{ID: c.boot.ID(), Addrs: c.boot.Host().Addrs()}
		if _, err := client.Reserve(ctx, stranger.Host(), ai); err == nil {
			t.Errorf("the owner's relay granted a reservation to the non-member %s", stranger.ID().ShortString())
		}
	}
	if err := queryStream(ctx, invited, worker.ID()); err != nil {
		t.Errorf("a member's raw query stream failed: %v", err)
	}
	ai := peer.AddrInfo{ID: c.boot.ID(), Addrs: c.boot.Host().Addrs()}
	if _, err := client.Reserve(ctx, invited.Host(), ai); err != nil {
		t.Errorf("the owner's relay refused a member: %v", err)
	}
	if err := forgerNode.Membership().LastRefusal(); err == nil {
		t.Error("the forger was never told why it was refused")
	} else {
		t.Logf("forger refused: %v", err)
	}
}

// A revoked member is cut off everywhere within 5 s: the owner's
// revocation spreads by gossip, every node closes its connections to the
// revoked peer and refuses new ones, and it leaves every table.
func TestClosedSwarmRevocationCutsOffWithin5s(t *testing.T) {
	c := newClosedNet(t)
	worker := c.member([]backend.Backend{demo.New("revoked-worker")})
	other := c.member([]backend.Backend{demo.New("other-worker")})
	client := c.member(nil)
	all := []*node.Node{c.boot, other, client}
	waitUntil(t, 30*time.Second, "every member sees both workers", func() bool {
		for _, n := range all {
			if !inTable(n, worker.ID()) || !inTable(n, other.ID()) {
				return false
			}
		}
		return true
	})
	// The client talks to the worker directly, so it has a connection of
	// its own to cut.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := client.Host().Connect(ctx, peer.AddrInfo{ID: worker.ID(), Addrs: worker.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	rev, err := c.owner.Revoke(worker.ID(), "")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.boot.Membership().Announce(rev.Encoded); err != nil {
		t.Fatal(err)
	}
	took := waitUntil(t, 5*time.Second, "the revoked worker cut off everywhere", func() bool {
		for _, n := range all {
			if n.Host().Network().Connectedness(worker.ID()) == network.Connected || inTable(n, worker.ID()) || !n.Membership().Revoked(worker.ID()) {
				return false
			}
		}
		return true
	})
	t.Logf("revoked worker cut off everywhere %s after the revocation", took.Round(time.Millisecond))
	if time.Since(start) > 5*time.Second {
		t.Fatalf("took %s", time.Since(start))
	}
	for _, n := range all {
		err := worker.Host().Connect(ctx, peer.AddrInfo{ID: n.ID(), Addrs: n.Host().Addrs()})
		if err == nil {
			// The dial may complete on the worker's side before the
			// other side's gater closes it: it must not stay.
			time.Sleep(500 * time.Millisecond)
			if worker.Host().Network().Connectedness(n.ID()) == network.Connected {
				t.Errorf("the revoked worker reconnected to %s", n.ID().ShortString())
			}
		}
		if err := n.Host().Connect(ctx, peer.AddrInfo{ID: worker.ID(), Addrs: worker.Host().Addrs()}); err == nil {
			t.Errorf("%s dialled the revoked worker", n.ID().ShortString())
		}
	}
	text, res, err := ask(ctx, client, chat("demo", "hello"))
	if err != nil || text == "" || res.Peer != other.ID() {
		t.Fatalf("after the revocation: %q from %v, %v (want the other worker)", text, res, err)
	}
}

// A peer that connects and presents no certificate is disconnected once
// the grace period is over, and is not let back into anyone's table.
func TestClosedSwarmDisconnectsPeersWithoutCertificate(t *testing.T) {
	c := newClosedNet(t, membership.WithGrace(2*time.Second))
	stranger := c.startKeyed(mustKey(t), []backend.Backend{demo.New("stranger")}, false)
	waitUntil(t, 10*time.Second, "the stranger connected to the owner's node", func() bool {
		return c.boot.Host().Network().Connectedness(stranger.ID()) == network.Connected
	})
	took := waitUntil(t, 15*time.Second, "the stranger disconnected", func() bool {
		return c.boot.Host().Network().Connectedness(stranger.ID()) != network.Connected
	})
	t.Logf("a peer without a certificate was disconnected %s after it was seen connected (grace 2 s)", took.Round(time.Millisecond))
	if inTable(c.boot, stranger.ID()) {
		t.Error("the stranger is in the owner's table")
	}
}

// Roles bind: a member whose certificate lacks the worker role may run a
// backend, but its announcement is not admitted anywhere, so no query
// goes to it; a member with the role is served as usual.
func TestClosedSwarmRolesBindAnnouncements(t *testing.T) {
	c := newClosedNet(t)
	worker := c.member([]backend.Backend{demo.New("worker-role")}, "worker")
	client := c.member([]backend.Backend{demo.New("client-role")}, "client")
	waitUntil(t, 30*time.Second, "the worker seen by the owner and the client", func() bool {
		return inTable(c.boot, worker.ID()) && inTable(client, worker.ID())
	})
	waitUntil(t, 10*time.Second, "the client is a member everywhere", func() bool {
		return c.boot.Membership().IsMember(client.ID()) && worker.Membership().IsMember(client.ID())
	})
	time.Sleep(2 * time.Second) // ten of the client's announcements
	for _, n := range []*node.Node{c.boot, worker} {
		if inTable(n, client.ID()) {
			t.Errorf("%s admitted the announcement of a member without the worker role", n.ID().ShortString())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for range 5 {
		_, res, err := ask(ctx, c.boot, chat("demo", "hello"))
		if err != nil || res.Peer != worker.ID() {
			t.Fatalf("query from the owner's node: %v, %v (want the worker)", res, err)
		}
	}
}

// An expired invite is refused with a message that says so and what to do.
func TestClosedSwarmExpiredInvite(t *testing.T) {
	owner, err := membership.NewOwner(mustKey(t), closedSwarm, membership.OwnerClock(func() time.Time { return time.Now().Add(-2 * time.Hour) }))
	if err != nil {
		t.Fatal(err)
	}
	inv, err := owner.Invite(nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, err = membership.New(closedSwarm, owner.ID(), membership.WithInvite(inv.Encoded))
	var exp *membership.ExpiredError
	if !errors.As(err, &exp) {
		t.Fatalf("err = %v, want an ExpiredError", err)
	}
	t.Logf("expired invite: %v", err)
}

func mustKey(t *testing.T) crypto.PrivKey {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func hasPeer(ais []peer.AddrInfo, p peer.ID) bool {
	for _, ai := range ais {
		if ai.ID == p {
			return true
		}
	}
	return false
}
