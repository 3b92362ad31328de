package ws_test

import (
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// A worker that dies mid-answer costs the browser nothing where the next
// worker can continue the answer (the chunks simply go on), else a
// query_restart and then the whole answer from another worker.
func TestWorkerDeathMidAnswer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    []swarmtest.Option
		restart bool
	}{
		{"continued", nil, false},
		{"restarted", []swarmtest.Option{swarmtest.NoContinue()}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := swarmtest.New(t, append(tc.opts, swarmtest.Workers(2), swarmtest.Clients(1), swarmtest.DemoDelay(20*time.Millisecond))...)
			h := newHarnessOn(t, s.Clients[0].Router())
			c := h.mustDial()
			c.hello()
			prompt := strings.TrimSpace(strings.Repeat("word ", 40))
			c.send(msg{"type": "submit_query", "query_id": "q1", "query": msg{"prompt": prompt, "query_type": "chat", "model_name": "demo"}})
			var text strings.Builder
			// Kill past the demo's header, mid-body.
			for range 8 {
				m, _ := c.until("query_chunk")
				text.WriteString(m.str("text"))
			}
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
			restarted := false
			for {
				m, _ := c.until("query_chunk", "query_restart", "query_result")
				switch m.str("type") {
				case "query_restart":
					restarted = true
					text.Reset()
					continue
				case "query_chunk":
					text.WriteString(m.str("text"))
					continue
				}
				if restarted != tc.restart {
					t.Fatalf("query_restart seen: %v, want %v", restarted, tc.restart)
				}
				got := m.str("result")
				if strings.Count(got, "[demo answer") != 1 || strings.Count(got, "You said: ") != 1 || !strings.HasSuffix(got, prompt) || got != text.String() {
					t.Fatalf("result %q (chunks %q) is not the whole answer", got, text.String())
				}
				return
			}
		})
	}
}
