package node

import (
	"github.com/mtor-swarm/mtor/node/canary"
	"github.com/mtor-swarm/mtor/node/router"
)

// WithCanary configures the honesty spot checks every node's router runs
// (package canary): their share of the routed traffic, interval, fanout.
func WithCanary(opts ...canary.Option) Option {
	return func(c *config) error { c.canaryOpts = append(c.canaryOpts, opts...); return nil }
}

// WithVerify makes the node a verifier: it runs a spot check every
// canary interval whatever its own traffic. It is not announced as a
// role: a liar that knew the verifiers could answer them alone honestly.
func WithVerify() Option {
	return func(c *config) error { c.canaryOpts = append(c.canaryOpts, canary.WithVerify(true)); return nil }
}

// WithoutCanary turns the spot checks off: every peer keeps reputation
// 100 in this node's routing.
func WithoutCanary() Option { return func(c *config) error { c.canaryOff = true; return nil } }

// canaryRouterOptions builds the checker of cfg, nil when off, and the
// router options that feed it and use its reputation book.
func canaryRouterOptions(cfg *config) (*canary.Checker, []router.Option) {
	if cfg.canaryOff {
		return nil, nil
	}
	chk := canary.New(canary.NewBook(), cfg.canaryOpts...)
	return chk, []router.Option{router.WithReputation(chk.Book()), router.WithQueryObserver(chk.Observe)}
}

// Canary is the node's spot checker, nil when turned off.
func (n *Node) Canary() *canary.Checker { return n.canary }
