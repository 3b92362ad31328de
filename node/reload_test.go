package node_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// A node given backends at run time becomes a worker that the swarm sees
// and queries at once; taking them away again ends its worker role.
func TestSetBackendsAtRunTime(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	w, c := s.Workers[0], s.Clients[0]
	if slices.Contains(c.State().Roles, "worker") {
		t.Fatalf("a node without backends has roles %v", c.State().Roles)
	}

	r := c.SetBackends(context.Background(), []backend.Backend{demo.New("c", demo.WithModel("added"), demo.WithDelay(0))})
	if len(r.Added) != 1 || len(r.Removed) != 0 || !strings.Contains(r.Added[0], "up: 1 model (added)") {
		t.Fatalf("reload = %+v", r)
	}
	if st := c.State(); !slices.Contains(st.Roles, "worker") || len(st.Backends) != 1 || st.Backends[0].State != "up" {
		t.Fatalf("state after the reload: %+v", st)
	}
	waitFor(t, 30*time.Second, func() bool {
		e, ok := w.Discovery().Table().Get(c.ID())
		return ok && slices.Contains(e.Announce.GetRoles(), "worker") && len(e.Announce.GetModels()) == 1 && e.Announce.GetModels()[0].GetName() == "added"
	}, "the other node to see the added model")
	text, res, err := ask(context.Background(), w, chat("added", "to the new worker"))
	if err != nil || res.Peer != c.ID() || !strings.Contains(text, "to the new worker") {
		t.Fatalf("query for the added model: %q, %+v, %v", text, res, err)
	}

	r = c.SetBackends(context.Background(), nil)
	if len(r.Removed) != 1 || len(r.Added) != 0 {
		t.Fatalf("reload = %+v", r)
	}
	if st := c.State(); slices.Contains(st.Roles, "worker") || len(st.Backends) != 0 {
		t.Fatalf("state after removing every backend: %+v", st)
	}
	waitFor(t, 30*time.Second, func() bool {
		e, ok := w.Discovery().Table().Get(c.ID())
		return !ok || len(e.Announce.GetModels()) == 0
	}, "the other node to see the model gone")
}
