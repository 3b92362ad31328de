package node

import (
	"context"
	"slices"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
)

// drainPoll is how often a removed backend is checked for queries still
// running on it.
const drainPoll = 100 * time.Millisecond

// Reload is what SetBackends changed, as lines for people.
type Reload struct {
	Added   []string // "ollama http://… up: 2 models"
	Removed []string // names of the backends taken away
	Kept    int
}

// SetBackends replaces the node's backends while it runs (what `mtor
// node` does on SIGHUP): a backend in bs that the node already has (the
// same value) is kept with its health; a new one is probed at once; a
// removed one takes no new query, and the queries running on it finish
// (a notice says when). The node announces the change at once and gains
// or loses the worker role. One reload runs at a time.
func (n *Node) SetBackends(ctx context.Context, bs []backend.Backend) Reload {
	n.bmu.Lock()
	defer n.bmu.Unlock()
	var r Reload
	next := make([]*watchedBackend, 0, len(bs))
	forWorker := make([]backend.Backend, 0, len(bs))
	var added []*watchedBackend
	for _, b := range bs {
		i := slices.IndexFunc(n.watched, func(w *watchedBackend) bool { return w.Backend == b })
		var w *watchedBackend
		if i >= 0 {
			w = n.watched[i]
			r.Kept++
		} else {
			w = watchBackend(b, n.onBackendChange)
			added = append(added, w)
		}
		next = append(next, w)
		forWorker = append(forWorker, w)
	}
	removed := n.worker.SetBackends(ctx, forWorker)
	n.watched = next
	n.cfg.backends = slices.Clone(bs)
	roles := slices.DeleteFunc(slices.Clone(n.roles), func(s string) bool { return s == "worker" })
	if len(bs) > 0 {
		roles = append([]string{"worker"}, roles...)
	}
	n.roles = roles
	if a := n.announcer(); a != nil {
		a.setRoles(roles)
		a.refresh()
	}
	for _, w := range added {
		st := w.state()
		r.Added = append(r.Added, backendLine(st))
	}
	for _, rm := range removed {
		r.Removed = append(r.Removed, rm.Name())
		if k := rm.InFlight(); k > 0 {
			n.notify(NoticeBackend, false, "%s removed; %d queries in flight finish on it first", rm.Name(), k)
			n.goRun(func() { n.awaitDrained(rm.Name(), rm.InFlight) })
		} else {
			n.notify(NoticeBackend, false, "%s removed", rm.Name())
		}
	}
	for _, line := range r.Added {
		n.notify(NoticeBackend, false, "added %s", line)
	}
	log.Infow("backends reloaded", "added", len(r.Added), "removed", len(r.Removed), "kept", r.Kept)
	return r
}

// awaitDrained says when the last query on a removed backend has ended.
func (n *Node) awaitDrained(name string, inFlight func() int) {
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for inFlight() > 0 {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
	}
	n.notify(NoticeBackend, false, "%s removed; its queries in flight have finished", name)
}

// backendLine is a backend's state with what the node does about one that
// is down.
func backendLine(st BackendState) string {
	if st.State == BackendDown {
		return st.String() + "; retrying every " + healthProbeInterval.String()
	}
	return st.String()
}
