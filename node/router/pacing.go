package router

import (
	"context"
	"sync"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
)

// Pacing of query stream opens per worker.
const (
	// DefaultOpensPerPeer bounds the queries of one worker between
	// opening their stream and its first frame (Accepted). A burst of a
	// thousand streams opened at once keeps a 2-core worker from
	// answering any of them within AcceptTimeout, and the router would
	// take it for frozen; paced, each waits its turn here, where the
	// wait does not count against the worker. Half of yamux's backlog
	// of unacknowledged opens and of QUIC's streams per connection (256
	// each): 32 made 1 000 slow streams wait for turns under load (TTFT
	// p99 1.7–2.4 s against 1.0–1.1 s with 128, docs/benchmarks.md).
	DefaultOpensPerPeer = 128
	// DefaultOpenQueuePerPeer bounds the queries waiting for one of those
	// turns; more are refused at once as this node's backpressure.
	DefaultOpenQueuePerPeer = 4096
)

// WithOpenPacing bounds the stream opens in flight to one worker (opens
// ≥ 1) and the queries waiting for one (queue ≥ 0).
func WithOpenPacing(opens, queue int) Option {
	return func(r *Router) {
		if opens >= 1 && queue >= 0 {
			r.pace = newPacer(opens, queue)
		}
	}
}

// pacer holds one gate per worker with opens in flight or waiting; a gate
// nobody uses is dropped, so the map stays as small as the workers in
// use.
type pacer struct {
	opens, queue int
	mu           sync.Mutex
	gates        map[peer.ID]*gate
}

type gate struct {
	slots   chan struct{} // a token per open in flight
	waiting int
	users   int // holding a slot or waiting for one
}

func newPacer(opens, queue int) *pacer {
	return &pacer{opens: opens, queue: queue, gates: map[peer.ID]*gate{}}
}

// try takes a turn to open a stream to p if one is free at once, and
// returns the func that gives it back (idempotent).
func (pc *pacer) try(p peer.ID) (release func(), ok bool) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.tryLocked(p)
}

func (pc *pacer) tryLocked(p peer.ID) (release func(), ok bool) {
	g := pc.gates[p]
	if g == nil {
		g = &gate{slots: make(chan struct{}, pc.opens)}
		pc.gates[p] = g
	}
	select {
	case g.slots <- struct{}{}:
		g.users++
		return pc.releaser(p, g), true
	default:
	}
	return nil, false // all taken: g has users, so it stays
}

// acquire waits for a turn to open a stream to p, FIFO among waiters, and
// returns the func that gives the turn back (idempotent). A full queue is
// that worker busy for now (paceFull); an ended ctx its error.
func (pc *pacer) acquire(ctx context.Context, p peer.ID) (release func(), err error) {
	pc.mu.Lock()
	if release, ok := pc.tryLocked(p); ok {
		pc.mu.Unlock()
		return release, nil
	}
	g := pc.gates[p]
	if g.waiting >= pc.queue {
		pc.mu.Unlock()
		return nil, paceFull{protocol.Errorf(protocol.CodeBusy, "this node has %d queries waiting to reach worker %s; try again shortly", g.waiting, ShortID(p))}
	}
	g.waiting++
	g.users++
	pc.mu.Unlock()
	select {
	case g.slots <- struct{}{}:
		pc.mu.Lock()
		g.waiting--
		pc.mu.Unlock()
		return pc.releaser(p, g), nil
	case <-ctx.Done():
		pc.mu.Lock()
		g.waiting--
		pc.leaveLocked(p, g)
		pc.mu.Unlock()
		return nil, ctxErr(ctx)
	}
}

func (pc *pacer) releaser(p peer.ID, g *gate) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			<-g.slots
			pc.mu.Lock()
			pc.leaveLocked(p, g)
			pc.mu.Unlock()
		})
	}
}

func (pc *pacer) leaveLocked(p peer.ID, g *gate) {
	if g.users--; g.users == 0 && pc.gates[p] == g {
		delete(pc.gates, p)
	}
}

// inflight reports the opens in flight and waiting for p, for tests.
func (pc *pacer) inflight(p peer.ID) (opens, waiting int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if g := pc.gates[p]; g != nil {
		return len(g.slots), g.waiting
	}
	return 0, 0
}

// paceFull is a worker's queue of this node's opens being full: that
// worker is busy for now, another may not be.
type paceFull struct{ err *protocol.Error }

func (e paceFull) Error() string { return e.err.Error() }
func (e paceFull) Unwrap() error { return e.err }
