package ws_test

import (
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// A worker that dies mid-answer costs the browser a query_restart, then the
// whole answer from another worker.
func TestWorkerDeathMidAnswerRestarts(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1), swarmtest.DemoDelay(20*time.Millisecond))
	h := newHarnessOn(t, s.Clients[0].Router())
	c := h.mustDial()
	c.hello()
	prompt := strings.TrimSpace(strings.Repeat("word ", 40))
	c.send(msg{"type": "submit_query", "query_id": "q1", "query": msg{"prompt": prompt, "query_type": "chat", "model_name": "demo"}})
	c.until("query_chunk")
	killed := false
	for _, w := range s.Workers {
		if running, _, _, _ := w.Worker().Load(); running > 0 {
			s.Kill(w)
			killed = true
			break
		}
	}
	if !killed {
		t.Fatal("no worker was running the query")
	}
	if m, _ := c.until("query_restart"); m.str("query_id") != "q1" {
		t.Fatalf("restart for %v", m)
	}
	res, _ := c.until("query_result")
	if got := res.str("result"); strings.Count(got, "[demo answer") != 1 || !strings.HasSuffix(got, prompt) {
		t.Fatalf("result after restart is not whole: %q", got)
	}
}
