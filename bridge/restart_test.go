package bridge

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// killOnFirstChunk wraps the router: when the first chunk arrives it kills
// the worker running the query, as a crashed volunteer machine would.
type killOnFirstChunk struct {
	Swarm
	s    *swarmtest.Swarm
	once sync.Once
}

func (k *killOnFirstChunk) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	return k.Swarm.Query(ctx, req, func(ev *pb.Event) error {
		if ev.GetChunk() != nil {
			k.once.Do(func() {
				for _, w := range k.s.Workers {
					if running, _, _, _ := w.Worker().Load(); running > 0 {
						k.s.Kill(w)
						return
					}
				}
			})
		}
		return h(ev)
	})
}

// A non-streaming chat completion survives the death of the worker that
// was answering: the client gets the whole answer from another worker.
func TestChatCompletionSurvivesWorkerDeath(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1), swarmtest.DemoDelay(20*time.Millisecond))
	sw := &killOnFirstChunk{Swarm: s.Clients[0].Router(), s: s}
	_, base := startBridge(t, sw)
	prompt := strings.TrimSpace(strings.Repeat("word ", 40))
	resp, body := postJSON(t, base+"/v1/chat/completions",
		`{"model":"demo","messages":[{"role":"user","content":"`+prompt+`"}]}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var out struct {
		Choices []struct {
			Message struct{ Content string } `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	got := out.Choices[0].Message.Content
	if strings.Count(got, "[demo answer") != 1 || !strings.HasSuffix(got, prompt) {
		t.Fatalf("answer is not whole after the restart: %q", got)
	}
}
