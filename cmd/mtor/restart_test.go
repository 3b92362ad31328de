package main

import (
	"context"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// killOnFirstChunk wraps a node's router: at the first chunk of each query
// it kills the worker answering, as a crashed volunteer machine would, so
// that the answer restarts on another worker.
type killOnFirstChunk struct {
	*router.Router
	s *swarmtest.Swarm
}

func (k *killOnFirstChunk) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	var once sync.Once
	return k.Router.Query(ctx, req, func(ev *pb.Event) error {
		if ev.GetChunk() != nil {
			once.Do(func() {
				for _, w := range k.s.Nodes() {
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

// serveAPI serves node n's control API on 127.0.0.1:0, its queries going
// through q, until the test ends, and returns its address.
func serveAPI(t *testing.T, n api.Node, q api.Router) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := api.NewServer(n, q)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	return ln.Addr().String()
}

var demoAnswer = regexp.MustCompile(`^\[demo answer from worker-\d+\] You said: `)

// mtor query, when the worker answering dies mid-answer and no other can
// continue the answer (the workers announce no "continue"): the streamed
// text keeps its partial first answer on a line of its own, stderr says
// so, and the complete answer follows; --json holds only the complete
// answer.
func TestQueryRestartAfterWorkerDeath(t *testing.T) {
	// Three workers: each subtest kills one, and one must be left.
	s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.NoContinue(), swarmtest.DemoDelay(20*time.Millisecond))
	addr := serveAPI(t, s.Bootstrap, &killOnFirstChunk{Router: s.Bootstrap.Router(), s: s})
	prompt := strings.TrimSpace(strings.Repeat("word ", 40))

	t.Run("streamed", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "query", "--api", addr, "--model", "demo", prompt)
		if code != exitOK {
			t.Fatalf("exit %d, stderr %q", code, stderr)
		}
		if !strings.Contains(stderr, restartNotice+"\n") {
			t.Fatalf("stderr %q lacks the restart notice", stderr)
		}
		lines := strings.Split(strings.TrimSuffix(stdout, "\n"), "\n")
		if len(lines) != 2 || !strings.HasSuffix(stdout, "\n") {
			t.Fatalf("stdout %q, want the partial answer and the complete one, a line each", stdout)
		}
		partial, whole := lines[0], lines[1]
		if !demoAnswer.MatchString(whole) || !strings.HasSuffix(whole, "You said: "+prompt) {
			t.Fatalf("last line %q is not the complete answer", whole)
		}
		if partial == "" || strings.HasSuffix(partial, "You said: "+prompt) || !strings.HasPrefix(partial, "[demo") {
			t.Fatalf("first line %q is not a partial answer", partial)
		}
	})

	t.Run("json", func(t *testing.T) {
		code, stdout, stderr := runCLI(t, "query", "--api", addr, "--model", "demo", "--json", prompt)
		out := queryAnswer(t, "query", code, stdout, stderr)
		if !demoAnswer.MatchString(out.Text) || !strings.HasSuffix(out.Text, "You said: "+prompt) || strings.Count(out.Text, "[demo") != 1 {
			t.Fatalf("text %q, want only the complete answer", out.Text)
		}
		if out.Attempts < 2 {
			t.Fatalf("attempts %d: the answer did not restart", out.Attempts)
		}
		if stderr != "" {
			t.Fatalf("stderr %q, want nothing with --json", stderr)
		}
	})
}
