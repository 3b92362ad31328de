package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/event"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/relayaddr"
)

// Join timing: how long the first dial of the join peers may take before
// the operator is warned, and the backoff of the retries after it.
const (
	DefaultJoinTimeout = 5 * time.Second
	joinRetryMin       = 2 * time.Second
	joinRetryMax       = time.Minute
	// joinSettle lets the first join peer introduce a few others before
	// the node says how many peers it is connected to.
	joinSettle = time.Second
	// alonePoll is how often a joined node checks that it still has peers.
	alonePoll = time.Second
)

// ErrJoinUnreachable: no join peer could be reached.
var ErrJoinUnreachable = errors.New("no join peer answered")

// NoticeKind says what a Notice is about.
type NoticeKind int

// Kinds of notices.
const (
	NoticeBackend      NoticeKind = iota + 1 // a backend's state changed
	NoticeJoin                               // joined, could not join, or lost every peer
	NoticeReachability                       // how other peers can reach this node changed
	NoticeMembership                         // closed swarm: refused, admitted, a revocation
)

// Notice is a change of the node's state that its operator should see at
// once, whatever the log level: a backend going down or up, the join
// succeeding or failing, reachability.
type Notice struct {
	Kind    NoticeKind
	Warning bool   // something is wrong and the operator may have to act
	Text    string // one line, without a trailing newline
}

// WithNotify sets where the node reports notices; f must not block long.
// Changes are reported, not the state at start: State has that.
func WithNotify(f func(Notice)) Option {
	return func(c *config) error { c.notify = f; return nil }
}

// WithJoinTimeout bounds the first dial of the join peers: after it the
// node warns that none answered, and keeps trying with backoff.
func WithJoinTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("join timeout %s: must be positive", d)
		}
		c.joinTimeout = d
		return nil
	}
}

// RelayPeer is a swarm peer that announces the relay role.
type RelayPeer struct {
	Peer  peer.ID
	Roles []string
	Age   time.Duration // since its last announcement
}

// State is what the node tells about itself: its roles, how others reach
// it, how connected it is, and its backends.
type State struct {
	Roles           []string
	Reachability    string    // public, behind NAT, relayed via …, loopback only, unknown
	RelayedVia      []peer.ID // relays holding a reservation for us
	ConnectedPeers  int       // peers with a libp2p connection
	Connections     int       // libp2p connections: more than ConnectedPeers where a peer is reached twice
	RedundantClosed int64     // connections closed as redundant since start (node/dupconn)
	Paths           Paths     // the connected peers by path
	SwarmPeers      int       // other peers whose announcements we hold
	Joining         bool      // join peers given and none connected yet
	JoinError       string    // why the last join attempt failed
	Backends        []BackendState
	Relays          []RelayPeer // swarm relays we know of
	ProbeInterval   time.Duration
	Gossip          discovery.Traffic // announce-topic traffic since start
}

// Paths counts connected peers by the path libp2p uses to each (a direct
// connection before a relayed one).
type Paths struct {
	Direct      int // direct, HolePunched of them made by a hole punch
	HolePunched int
	Relayed     int // through a relay only
}

// paths counts the connected peers by path.
func (n *Node) paths() Paths {
	var ps Paths
	for _, p := range n.h.Network().Peers() {
		direct, punched := false, false
		for _, c := range n.h.Network().ConnsToPeer(p) {
			if !relayaddr.IsCircuit(c.RemoteMultiaddr()) {
				direct = true
				punched = punched || n.punch.HolePunched(c)
			}
		}
		switch {
		case punched:
			ps.Direct++
			ps.HolePunched++
		case direct:
			ps.Direct++
		default:
			ps.Relayed++
		}
	}
	return ps
}

// status holds the parts of State that loops update.
type status struct {
	mu         sync.Mutex
	joining    bool
	joinErr    error
	joined     chan struct{} // closed at the first successful join
	joinFailed chan struct{} // closed when the first join attempt failed
	joinedOnce sync.Once
	failedOnce sync.Once
}

func (n *Node) notify(kind NoticeKind, warning bool, format string, args ...any) {
	text := fmt.Sprintf(format, args...)
	if warning {
		log.Warn(text)
	} else {
		log.Info(text)
	}
	if n.cfg.notify != nil {
		n.cfg.notify(Notice{Kind: kind, Warning: warning, Text: text})
	}
}

// onBackendChange reports a backend's new state; the first probe's result
// is the starting state, which State reports.
func (n *Node) onBackendChange(prev, next BackendState) {
	if prev.State == BackendStarting {
		return
	}
	if next.State == BackendDown {
		n.notify(NoticeBackend, true, "%s; retrying every %s", next, healthProbeInterval)
		return
	}
	n.notify(NoticeBackend, false, "%s", next)
}

// State reports the node's state now.
func (n *Node) State() State {
	n.bmu.Lock()
	roles, watched := slices.Clone(n.roles), n.watched
	n.bmu.Unlock()
	st := State{
		Roles:           roles,
		ConnectedPeers:  len(n.h.Network().Peers()),
		Connections:     len(n.h.Network().Conns()),
		RedundantClosed: n.prune.Closed(),
		Paths:           n.paths(),
		ProbeInterval:   healthProbeInterval,
	}
	st.Reachability, st.RelayedVia = n.reachability()
	n.st.mu.Lock()
	st.Joining = n.st.joining
	if n.st.joinErr != nil {
		st.JoinError = n.st.joinErr.Error()
	}
	n.st.mu.Unlock()
	for _, w := range watched {
		st.Backends = append(st.Backends, w.state())
	}
	st.Gossip = n.disc.Traffic()
	now := time.Now()
	for _, e := range n.disc.Table().Snapshot() {
		if e.Self {
			continue
		}
		st.SwarmPeers++
		if roles := e.Announce.GetRoles(); slices.Contains(roles, "relay") {
			st.Relays = append(st.Relays, RelayPeer{Peer: e.Peer, Roles: slices.Clone(roles), Age: now.Sub(e.Received)})
		}
	}
	return st
}

// reachability says how other peers reach this node, in words: the relays
// it holds reservations on, else the relay keeper's verdict (forced,
// AutoNAT's, or presumed from the addresses).
func (n *Node) reachability() (string, []peer.ID) {
	ri := n.relays.info()
	if len(ri.Relays) > 0 {
		via := make([]peer.ID, len(ri.Relays))
		ids := make([]string, len(ri.Relays))
		for i, r := range ri.Relays {
			via[i], ids[i] = r.Peer, r.Peer.String()
		}
		return "behind NAT, relayed via " + strings.Join(ids, ", "), via
	}
	loopback := true
	for _, a := range n.h.Addrs() {
		loopback = loopback && manet.IsIPLoopback(a)
	}
	switch {
	case loopback && ri.How != "forced":
		return "loopback only (this machine)", nil
	case ri.Status == ReachabilityPublic:
		return "public (" + ri.How + ")", nil
	case ri.Status == ReachabilityPrivate:
		return "behind NAT (" + ri.How + "; looking for a relay)", nil
	}
	return "unknown (checking)", nil
}

// reachLoop follows libp2p's reachability verdicts and our addresses (a
// relay reservation adds one) and reports changes.
func (n *Node) reachLoop(sub event.Subscription) {
	defer sub.Close()
	last, _ := n.reachability()
	for {
		select {
		case <-n.ctx.Done():
			return
		case _, ok := <-sub.Out():
			if !ok {
				return
			}
			if text, _ := n.reachability(); text != last {
				last = text
				n.notify(NoticeReachability, false, "reachability: %s", text)
			}
		}
	}
}

// joinLoop dials the join peers until one answers, warning once when none
// answered within the join timeout and retrying with backoff; once joined
// it says how many peers the node is connected to, and starts over when
// every peer is gone (the join peer restarted, the network went away).
func (n *Node) joinLoop(boot []peer.AddrInfo) {
	retry := backoff{floor: joinRetryMin, ceil: joinRetryMax}
	warned := false
	for {
		err := n.dialJoin(n.ctx, boot)
		if n.ctx.Err() != nil {
			return
		}
		if err != nil {
			n.st.mu.Lock()
			n.st.joinErr = err
			n.st.mu.Unlock()
			n.st.failedOnce.Do(func() { close(n.st.joinFailed) })
			wait := retry.next()
			if !warned {
				n.notify(NoticeJoin, true, "%v; the node runs alone until one does (retrying with backoff; check the join token or address)", err)
				warned = true
			} else {
				log.Infow("join retry failed", "err", err, "next", wait)
			}
			if !sleepCtx(n.ctx, wait) {
				return
			}
			continue
		}
		n.st.mu.Lock()
		n.st.joining, n.st.joinErr = false, nil
		n.st.mu.Unlock()
		if !sleepCtx(n.ctx, joinSettle) {
			return
		}
		n.st.joinedOnce.Do(func() { close(n.st.joined) })
		n.notify(NoticeJoin, false, "connected to %d peers of swarm %s", len(n.h.Network().Peers()), n.cfg.swarm)
		if !n.waitAlone() {
			return
		}
		n.st.mu.Lock()
		n.st.joining = true
		n.st.mu.Unlock()
		n.notify(NoticeJoin, true, "lost every peer of swarm %s; dialling the join peers again", n.cfg.swarm)
		retry.reset()
		warned = true
	}
}

// dialJoin dials every join peer at once; nil when at least one answered.
// discovery.Connect clears the back-off that discovery's own failed dial
// to the same peer a moment ago left, so it does not hide why the peer is
// unreachable.
func (n *Node) dialJoin(ctx context.Context, boot []peer.AddrInfo) error {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.joinTimeout)
	defer cancel()
	var (
		mu      sync.Mutex
		reached bool
		errs    []string
		wg      sync.WaitGroup
	)
	for _, ai := range boot {
		wg.Go(func() {
			err := discovery.Connect(ctx, n.h, ai)
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				reached = true
				return
			}
			errs = append(errs, fmt.Sprintf("%s: %s", joinAddr(ai), dialCause(err, n.cfg.joinTimeout)))
		})
	}
	wg.Wait()
	if reached || len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w (%s)", ErrJoinUnreachable, strings.Join(errs, "; "))
}

// waitAlone returns true once the node has had no peer for two polls in a
// row, false when the node stops. Until then it dials again, each with a
// backoff of its own, the join peers it lost while keeping others: a join
// peer that restarted (a bootstrap, a bridge keeping the swarm view) hears
// of this node again only when the node dials it, and nothing else need
// (the DHT dials its bootstrap peers only once its routing table is
// empty).
func (n *Node) waitAlone() bool {
	t := time.NewTicker(alonePoll)
	defer t.Stop()
	empty := 0
	lost := map[peer.ID]*redial{}
	for {
		select {
		case <-n.ctx.Done():
			return false
		case <-t.C:
		}
		if len(n.h.Network().Peers()) > 0 {
			empty = 0
			n.redialJoinPeers(lost, time.Now())
			continue
		}
		if empty++; empty >= 2 {
			return true
		}
	}
}

// redial is the state of dialling one lost join peer again.
type redial struct {
	next time.Time   // not before
	wait backoff     // after each dial
	busy atomic.Bool // a dial is under way
}

// redialJoinPeers dials the join peers that are not connected and whose
// turn has come, one dial per peer at a time. The first dial goes at once,
// then the waits back off from joinRetryMin to joinRetryMax, spread so
// that the workers of a bootstrap back from a restart do not all dial it
// in the same second.
func (n *Node) redialJoinPeers(lost map[peer.ID]*redial, now time.Time) {
	for _, ai := range n.joinPeers {
		if n.h.Network().Connectedness(ai.ID) == network.Connected {
			delete(lost, ai.ID)
			continue
		}
		r := lost[ai.ID]
		if r == nil {
			r = &redial{next: now, wait: backoff{floor: joinRetryMin, ceil: joinRetryMax}}
			lost[ai.ID] = r
		}
		if now.Before(r.next) || !r.busy.CompareAndSwap(false, true) {
			continue
		}
		r.next = now.Add(r.wait.next())
		n.goRun(func() {
			defer r.busy.Store(false)
			ctx, cancel := context.WithTimeout(n.ctx, n.cfg.joinTimeout)
			defer cancel()
			if err := discovery.Connect(ctx, n.h, ai); err != nil {
				log.Debugw("join peer still unreachable", "peer", ai.ID, "err", dialCause(err, n.cfg.joinTimeout))
				return
			}
			log.Infow("join peer reached again", "peer", ai.ID)
		})
	}
}

// WaitJoined waits until a join peer answered (nil), the first attempt
// failed (an error wrapping ErrJoinUnreachable) or ctx ends. A node with
// no join peers has nothing to wait for.
func (n *Node) WaitJoined(ctx context.Context) error {
	if len(n.joinPeers) == 0 {
		return nil
	}
	select {
	case <-n.st.joined:
		return nil
	case <-n.st.joinFailed:
		n.st.mu.Lock()
		defer n.st.mu.Unlock()
		if n.st.joinErr == nil { // joined since
			return nil
		}
		return n.st.joinErr
	case <-ctx.Done():
		return ctx.Err()
	}
}

// joinAddr is a join peer as people wrote it: its first address.
func joinAddr(ai peer.AddrInfo) string {
	if len(ai.Addrs) == 0 {
		return ai.ID.String()
	}
	return ai.Addrs[0].String()
}

// dialCause is the reason a dial failed in a few words, instead of
// libp2p's multi-line report of every address tried.
func dialCause(err error, timeout time.Duration) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Sprintf("no answer within %s", timeout)
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "no route to host"
	case errors.Is(err, swarm.ErrDialBackoff):
		return "a dial failed moments ago (backing off)"
	case errors.Is(err, discovery.ErrClosedAtOnce):
		return "the connection closed right after the handshake (" + refusedWhy + ")"
	}
	s := err.Error()
	if strings.Contains(s, "peer id mismatch") {
		return "a different peer answers at that address (is the join token stale?)"
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		first, rest := s[:i], s[i+1:]
		s = first
		// libp2p's first line then says only that every address
		// failed; the first address's own cause says why.
		if strings.HasSuffix(first, "all dials failed") {
			line, _, _ := strings.Cut(rest, "\n")
			line = strings.TrimPrefix(strings.TrimSpace(line), "* ")
			if _, cause, ok := strings.Cut(line, "] "); ok && strings.HasPrefix(line, "[") && cause != "" {
				s = cause
			}
		}
	}
	if strings.Contains(s, "failed to negotiate security protocol") && (strings.HasSuffix(s, "EOF") || strings.HasSuffix(s, "connection reset by peer")) {
		return "the connection closed during the handshake (" + refusedWhy + ")"
	}
	return strings.TrimSpace(s)
}

// refusedWhy says why a connection closed at once likely did.
const refusedWhy = "likely refused: a closed swarm that does not admit this node, the peer's connection limits, or a firewall"

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
