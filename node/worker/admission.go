package worker

import (
	"context"
	"sync"

	"github.com/mtor-swarm/mtor/protocol"
)

// admission bounds concurrency and queueing: at most max queries run, at
// most maxQueue wait, higher tier first (requesters that contributed to
// this node, when that preference is on), then higher priority, FIFO
// within both.
type admission struct {
	mu       sync.Mutex
	running  int
	max      int
	maxQueue int
	queue    []*ticket
	seq      uint64
}

type ticket struct {
	tier  int // 1 contributor, 0 neutral, -1 net consumer; 0 when the preference is off
	prio  int32
	seq   uint64
	ready chan struct{}
	done  bool // admitted (running) or removed
}

func newAdmission(max, maxQueue int) *admission {
	return &admission{max: max, maxQueue: maxQueue}
}

// enter admits at once (position 0) or queues (position >= 1); a full
// queue is BUSY so that the router tries another worker right away.
func (a *admission) enter(prio int32, tier int) (*ticket, int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t := &ticket{prio: prio, tier: tier, ready: make(chan struct{})}
	if a.running < a.max && len(a.queue) == 0 {
		a.running++
		t.done = true
		close(t.ready)
		return t, 0, nil
	}
	if len(a.queue) >= a.maxQueue {
		return nil, 0, protocol.Errorf(protocol.CodeBusy, "worker busy: %d running, %d queued", a.running, len(a.queue))
	}
	a.seq++
	t.seq = a.seq
	// Keep the queue sorted: tier, then priority descending, then arrival.
	i := len(a.queue)
	for i > 0 && t.ahead(a.queue[i-1]) {
		i--
	}
	a.queue = append(a.queue, nil)
	copy(a.queue[i+1:], a.queue[i:])
	a.queue[i] = t
	return t, i + 1, nil
}

// ahead reports whether t goes before u in the queue.
func (t *ticket) ahead(u *ticket) bool {
	if t.tier != u.tier {
		return t.tier > u.tier
	}
	return t.prio > u.prio
}

// wait blocks until t is admitted or ctx ends; on ctx end t leaves the queue.
func (a *admission) wait(ctx context.Context, t *ticket) error {
	select {
	case <-t.ready:
		return nil
	case <-ctx.Done():
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	select {
	case <-t.ready:
		// Admitted while we were giving up: hand the slot on.
		a.releaseLocked()
	default:
		for i, q := range a.queue {
			if q == t {
				a.queue = append(a.queue[:i], a.queue[i+1:]...)
				break
			}
		}
		t.done = true
	}
	return ctx.Err()
}

// release frees a running slot and admits the next in line.
func (a *admission) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.releaseLocked()
}

func (a *admission) releaseLocked() {
	a.running--
	for a.running < a.max && len(a.queue) > 0 {
		t := a.queue[0]
		a.queue = a.queue[1:]
		a.running++
		t.done = true
		close(t.ready)
	}
}

// load reports running and queued counts.
func (a *admission) load() (running, queued int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.running, len(a.queue)
}

// position is t's place in the queue (1 = next), or 0 once admitted.
func (a *admission) position(t *ticket) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, q := range a.queue {
		if q == t {
			return i + 1
		}
	}
	return 0
}
