// Package swarmtest starts real mtor nodes on loopback for tests: a
// bootstrap node, workers and clients, all joined through the bootstrap,
// so that a multi-node test is a few lines.
package swarmtest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
)

// AnnounceInterval is short so that tests converge in well under a second.
const AnnounceInterval = 200 * time.Millisecond

type config struct {
	workers   int
	clients   int
	demoDelay time.Duration
	backends  func(i int, label string) []backend.Backend
	nodeOpts  []node.Option
	quic      bool
	noCont    bool
}

// Option configures the swarm.
type Option func(*config)

// Workers sets how many workers start (default 2).
func Workers(n int) Option { return func(c *config) { c.workers = n } }

// Clients sets how many nodes without backends start besides the bootstrap.
func Clients(n int) Option { return func(c *config) { c.clients = n } }

// DemoDelay sets the demo backend's delay between tokens.
func DemoDelay(d time.Duration) Option { return func(c *config) { c.demoDelay = d } }

// Backends replaces the demo backend: f returns worker i's backends.
func Backends(f func(i int, label string) []backend.Backend) Option {
	return func(c *config) { c.backends = f }
}

// NodeOptions are added to every node.
func NodeOptions(opts ...node.Option) Option {
	return func(c *config) { c.nodeOpts = append(c.nodeOpts, opts...) }
}

// NoContinue makes the demo workers announce no "continue" feature, as
// backends that cannot continue an answer do: a worker lost mid-answer is
// then replaced by a restart, not a continuation.
func NoContinue() Option { return func(c *config) { c.noCont = true } }

// noContinue hides a backend's continue feature.
type noContinue struct{ backend.Backend }

func (n noContinue) Models(ctx context.Context) ([]backend.Model, error) {
	ms, err := n.Backend.Models(ctx)
	for i := range ms {
		ms[i].Features = slices.DeleteFunc(slices.Clone(ms[i].Features), func(f string) bool { return f == protocol.FeatureContinue })
	}
	return ms, err
}

// QUIC makes nodes listen on QUIC only instead of TCP only.
func QUIC() Option { return func(c *config) { c.quic = true } }

// Swarm is a running test swarm.
type Swarm struct {
	t         testing.TB
	cfg       config
	Bootstrap *node.Node
	Workers   []*node.Node
	Clients   []*node.Node

	mu     sync.Mutex
	closed map[*node.Node]bool
}

// New starts the swarm and waits until every node sees every worker.
// Nodes are closed when the test ends.
func New(t testing.TB, opts ...Option) *Swarm {
	t.Helper()
	cfg := config{workers: 2, demoDelay: time.Millisecond}
	for _, o := range opts {
		o(&cfg)
	}
	s := &Swarm{t: t, cfg: cfg, closed: map[*node.Node]bool{}}
	s.Bootstrap = s.start(nil, node.WithRoles("bootstrap"))
	for i := 0; i < cfg.workers; i++ {
		s.Workers = append(s.Workers, s.AddWorker())
	}
	for i := 0; i < cfg.clients; i++ {
		s.Clients = append(s.Clients, s.start(nil))
	}
	s.WaitConverged(30 * time.Second)
	return s
}

func (s *Swarm) listen() string {
	if s.cfg.quic {
		return "/ip4/127.0.0.1/udp/0/quic-v1"
	}
	return "/ip4/127.0.0.1/tcp/0"
}

// start runs one node joined to the bootstrap (if any).
func (s *Swarm) start(backends []backend.Backend, extra ...node.Option) *node.Node {
	s.t.Helper()
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		s.t.Fatal(err)
	}
	opts := []node.Option{
		node.WithIdentity(key),
		node.WithListenAddrs(s.listen()),
		node.WithMDNS(false),
		node.WithAnnounceInterval(AnnounceInterval),
		node.WithGracePeriod(5 * time.Second),
		node.WithBackends(backends...),
	}
	if s.Bootstrap != nil {
		opts = append(opts, node.WithJoin(s.Bootstrap.JoinLine()))
	}
	opts = append(opts, s.cfg.nodeOpts...)
	opts = append(opts, extra...)
	n, err := node.New(context.Background(), opts...)
	if err != nil {
		s.t.Fatalf("start node: %v", err)
	}
	s.t.Cleanup(func() { s.Kill(n) })
	return n
}

// AddWorker starts one more worker with the configured backends and
// extra node options.
func (s *Swarm) AddWorker(extra ...node.Option) *node.Node {
	s.t.Helper()
	i := len(s.Workers)
	label := fmt.Sprintf("worker-%d", i)
	var bs []backend.Backend
	if s.cfg.backends != nil {
		bs = s.cfg.backends(i, label)
	} else {
		bs = []backend.Backend{demo.New(label, demo.WithDelay(s.cfg.demoDelay))}
	}
	if s.cfg.noCont {
		for i, b := range bs {
			bs[i] = noContinue{b}
		}
	}
	return s.start(bs, extra...)
}

// Nodes lists every node that is still running.
func (s *Swarm) Nodes() []*node.Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*node.Node
	for _, n := range append(append([]*node.Node{s.Bootstrap}, s.Workers...), s.Clients...) {
		if n != nil && !s.closed[n] {
			out = append(out, n)
		}
	}
	return out
}

// Kill closes n abruptly: no draining announcement, streams reset.
func (s *Swarm) Kill(n *node.Node) {
	s.mu.Lock()
	if s.closed[n] {
		s.mu.Unlock()
		return
	}
	s.closed[n] = true
	s.mu.Unlock()
	_ = n.Close()
}

// WaitConverged waits until every running node's table holds every
// running worker with its models.
func (s *Swarm) WaitConverged(timeout time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		missing := s.missing()
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("swarm did not converge in %s: %s", timeout, missing)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Swarm) missing() string {
	nodes := s.Nodes()
	s.mu.Lock()
	var workers []*node.Node
	for _, w := range s.Workers {
		if !s.closed[w] {
			workers = append(workers, w)
		}
	}
	s.mu.Unlock()
	for _, n := range nodes {
		for _, w := range workers {
			e, ok := n.Discovery().Table().Get(w.ID())
			if !ok || len(e.Announce.GetModels()) == 0 {
				return fmt.Sprintf("%s does not see worker %s", n.ID().ShortString(), w.ID().ShortString())
			}
		}
	}
	return ""
}

// WaitGone waits until no running node's table holds peer n.
func (s *Swarm) WaitGone(n *node.Node, timeout time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		seen := false
		for _, o := range s.Nodes() {
			if _, ok := o.Discovery().Table().Get(n.ID()); ok {
				seen = true
			}
		}
		if !seen {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("%s still in a peer table after %s", n.ID().ShortString(), timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
