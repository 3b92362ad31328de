package node

import (
	"context"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/relayaddr"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Announce timing: a slow heartbeat with jitter, and on change at most
// every minSpacing so a burst of queries does not flood the topic.
const (
	DefaultAnnounceInterval = 10 * time.Second
	minSpacing              = 500 * time.Millisecond
	reprovideInterval       = 30 * time.Minute
	// provideFor bounds the tries to put one provider record; a record
	// not put is tried again at the next publish.
	provideFor = time.Minute
)

// publisher is what the announcer needs of discovery.
type publisher interface {
	Publish(ctx context.Context, a *pb.Announce) error
	Provide(ctx context.Context, model string) error
	ProvideRelay(ctx context.Context) error
}

// GPUSource reports the GPUs of this machine for announcements.
type GPUSource interface {
	GPUs() []*pb.GPU
}

// announcer publishes this node's announcement.
type announcer struct {
	pub      publisher
	w        *worker.Worker
	gpus     GPUSource
	roles    atomic.Pointer[[]string] // replaced when a reload adds or removes the worker role
	version  string
	interval time.Duration
	// incarnation is random per process start: peers that see it change
	// know this node restarted.
	incarnation uint64
	addrs       func() []ma.Multiaddr // listen addresses to announce; may be nil

	// provideRetry spaces the tries to put a provider record.
	provideRetry backoff

	kick  chan struct{}
	force atomic.Bool // the next kick publishes even without a change

	mu       sync.Mutex
	last     *pb.Announce // content of the last publish, without seq/time
	provided map[string]time.Time
	// relayProvided: when the relay key was last provided (zero: not,
	// or the last try failed).
	relayProvided time.Time
}

func newAnnouncer(pub publisher, w *worker.Worker, gpus GPUSource, roles []string, version string, interval time.Duration) *announcer {
	a := &announcer{
		pub: pub, w: w, gpus: gpus, version: version, interval: interval,
		incarnation:  rand.Uint64() | 1, // never 0, which means "not sent"
		kick:         make(chan struct{}, 1),
		provided:     map[string]time.Time{},
		provideRetry: backoff{floor: time.Second, ceil: 10 * time.Second},
	}
	a.setRoles(roles)
	return a
}

// setRoles changes the announced roles; the next publish carries them.
func (a *announcer) setRoles(roles []string) {
	r := slices.Clone(roles)
	a.roles.Store(&r)
}

// changed asks for a prompt publish; it never blocks.
func (a *announcer) changed() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// refresh asks for a prompt publish even if nothing changed (a peer that
// just joined the topic has not seen our announcement); it never blocks.
func (a *announcer) refresh() {
	a.force.Store(true)
	a.changed()
}

// build assembles the announcement from the worker's state.
func (a *announcer) build() *pb.Announce {
	running, queued, maxC, maxQ := a.w.Load()
	ann := &pb.Announce{
		Roles:    *a.roles.Load(),
		Version:  a.version,
		Health:   a.w.Health(),
		Draining: a.w.Draining(),
		Load: &pb.Load{
			InFlight: uint32(running), Queued: uint32(queued),
			MaxConcurrency: uint32(maxC), MaxQueue: uint32(maxQ),
		},
		Incarnation: a.incarnation,
	}
	if a.addrs != nil {
		for _, m := range announceOrder(a.addrs()) {
			if b := m.Bytes(); len(b) <= protocol.MaxAddrLen && len(ann.Addrs) < protocol.MaxAnnAddrs {
				ann.Addrs = append(ann.Addrs, b)
			}
		}
	}
	caps := a.w.Capabilities()
	sort.Slice(caps, func(i, j int) bool { return caps[i].Name < caps[j].Name })
	for _, c := range caps {
		types := slices.Clone(c.Types)
		slices.Sort(types)
		ann.Models = append(ann.Models, &pb.ModelInfo{
			Name: c.Name, Types: types, ContextLength: c.ContextLength,
			TokensPerSec: c.TokensPerSec, P50TtftMs: c.P50TTFTMs,
			JoulesPerToken: c.JoulesPerToken, Backend: c.Backend,
			Features: slices.Sorted(slices.Values(c.Features)),
		})
	}
	if a.gpus != nil {
		ann.Gpus = a.gpus.GPUs()
	}
	return ann
}

// publish sends the announcement if it changed or force is set, and
// provides newly served models in the DHT.
func (a *announcer) publish(ctx context.Context, force bool) (published bool) {
	ann := a.build()
	a.mu.Lock()
	// Between heartbeats only changes that alter routing are worth a
	// message to every node: measured figures, GPU readings and load
	// within the same class wait for the heartbeat (routers track their
	// own in-flight counts meanwhile).
	same := a.last != nil && proto.Equal(significant(a.last), significant(ann))
	if same && !force {
		a.mu.Unlock()
		return false
	}
	a.last = ann
	var toProvide []string
	now := time.Now()
	if !ann.GetDraining() {
		for _, m := range ann.GetModels() {
			if t, ok := a.provided[m.GetName()]; !ok || now.Sub(t) > reprovideInterval {
				a.provided[m.GetName()] = now
				toProvide = append(toProvide, m.GetName())
			}
		}
	}
	provideRelay := slices.Contains(ann.GetRoles(), "relay") && now.Sub(a.relayProvided) > reprovideInterval
	if provideRelay {
		a.relayProvided = now
	}
	a.mu.Unlock()
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if err := a.pub.Publish(pctx, ann); err != nil && ctx.Err() == nil {
		log.Warnw("publish announcement", "err", err)
	}
	cancel()
	for _, m := range toProvide {
		go func() {
			if !a.provide(ctx, func(ctx context.Context) error { return a.pub.Provide(ctx, m) }) {
				a.mu.Lock()
				delete(a.provided, m)
				a.mu.Unlock()
			}
		}()
	}
	if provideRelay {
		go func() {
			if !a.provide(ctx, a.pub.ProvideRelay) {
				a.mu.Lock()
				a.relayProvided = time.Time{}
				a.mu.Unlock()
			}
		}()
	}
	return true
}

// provide puts a provider record with f, trying again for up to a
// minute: a node just started has an empty DHT routing table, or only
// peers still being identified, and the nodes that need the record
// (bridges without the swarm view, nodes looking for relays) wait for
// it. It reports whether the record was put.
func (a *announcer) provide(ctx context.Context, f func(context.Context) error) bool {
	pctx, cancel := context.WithTimeout(ctx, provideFor)
	defer cancel()
	b := a.provideRetry
	for {
		err := f(pctx)
		if err == nil {
			return true
		}
		if pctx.Err() != nil {
			if ctx.Err() == nil {
				log.Debugw("provide", "err", err)
			}
			return false
		}
		select {
		case <-pctx.Done():
		case <-time.After(b.next()):
		}
	}
}

// announceOrder sorts addresses by use to others, so that the ones cut by
// the limit on announced addresses are the least useful: public first
// (--announce ones lead the list already), then relayed, then private,
// then loopback. The order within a class is kept.
func announceOrder(addrs []ma.Multiaddr) []ma.Multiaddr {
	class := func(m ma.Multiaddr) int {
		switch {
		case relayaddr.IsCircuit(m):
			return 1
		case manet.IsIPLoopback(m):
			return 3
		case manet.IsPublicAddr(m):
			return 0
		}
		return 2
	}
	out := slices.Clone(addrs)
	slices.SortStableFunc(out, func(x, y ma.Multiaddr) int { return class(x) - class(y) })
	return out
}

// significant is the part of an announcement whose change warrants a
// publish before the next heartbeat.
func significant(a *pb.Announce) *pb.Announce {
	// Addresses: a new relayed address is how a node behind NAT becomes
	// reachable, so it is announced at once.
	out := &pb.Announce{Roles: a.GetRoles(), Draining: a.GetDraining(), Health: (a.GetHealth() + 10) / 20, Addrs: a.GetAddrs()}
	for _, m := range a.GetModels() {
		out.Models = append(out.Models, &pb.ModelInfo{Name: m.GetName(), Types: m.GetTypes()})
	}
	l := a.GetLoad()
	// Load class: slots free, full, or queueing (by queue fill quarter).
	switch {
	case l.GetInFlight() < l.GetMaxConcurrency():
		out.Load = &pb.Load{InFlight: 0}
	case l.GetQueued() == 0:
		out.Load = &pb.Load{InFlight: 1}
	default:
		out.Load = &pb.Load{InFlight: 2, Queued: 4 * l.GetQueued() / max(l.GetMaxQueue(), 1)}
	}
	return out
}

// run publishes on change (spaced) and on a jittered heartbeat until ctx ends.
func (a *announcer) run(ctx context.Context) {
	a.publish(ctx, true)
	heartbeat := time.NewTimer(a.jitter())
	defer heartbeat.Stop()
	// Kicks are coalesced into one publish at most every minSpacing; the
	// loop never sleeps, so a stream of kicks cannot starve the heartbeat.
	spacing := time.NewTimer(0)
	<-spacing.C
	defer spacing.Stop()
	pending := false
	var lastKick time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-heartbeat.C:
			a.publish(ctx, true)
			heartbeat.Reset(a.jitter())
		case <-a.kick:
			if !pending {
				pending = true
				spacing.Reset(max(minSpacing-time.Since(lastKick), 0))
			}
		case <-spacing.C:
			pending = false
			lastKick = time.Now()
			if a.publish(ctx, a.force.Swap(false)) {
				heartbeat.Reset(a.jitter())
			}
		}
	}
}

// jitter is the interval ±20%, so nodes started together drift apart.
func (a *announcer) jitter() time.Duration {
	f := 0.8 + 0.4*rand.Float64()
	return time.Duration(float64(a.interval) * f)
}
