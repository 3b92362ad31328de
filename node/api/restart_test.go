package api_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// A worker killed mid-answer costs the API client nothing: the next
// worker continues the answer where the model can (one unbroken answer,
// no restart event), else it starts over after a restart event.
func TestWorkerDeathMidAnswer(t *testing.T) {
	for _, tc := range []struct {
		name     string
		opts     []swarmtest.Option
		restarts int
	}{
		{"continued", nil, 0},
		{"restarted", []swarmtest.Option{swarmtest.NoContinue()}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := swarmtest.New(t, append(tc.opts, swarmtest.Workers(2), swarmtest.DemoDelay(20*time.Millisecond))...)
			c := serve(t, s.Bootstrap)
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()

			prompt := strings.TrimSpace(strings.Repeat("word ", 60))
			var once sync.Once
			var text strings.Builder
			restarts, chunks := 0, 0
			killed := ""
			done, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Prompt: prompt}, func(ev *api.Event) error {
				switch ev.Event {
				case api.EventRestart:
					restarts++
					text.Reset()
				case api.EventChunk:
					text.WriteString(ev.Text)
					// Kill past the demo's header, mid-body.
					if chunks++; chunks < 8 {
						return nil
					}
					once.Do(func() {
						for _, w := range s.Workers {
							if running, _, _, _ := w.Worker().Load(); running > 0 {
								killed = w.ID().String()
								s.Kill(w)
								return
							}
						}
					})
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if killed == "" {
				t.Fatal("found no worker running the query")
			}
			if restarts != tc.restarts || done.Peer == killed {
				t.Fatalf("restarts = %d (want %d), answered by %s (killed %s)", restarts, tc.restarts, done.Peer, killed)
			}
			if got := text.String(); strings.Count(got, "[demo answer") != 1 || strings.Count(got, "You said: ") != 1 || !strings.HasSuffix(got, prompt) {
				t.Fatalf("answer is not whole: %q", got)
			}
		})
	}
}
