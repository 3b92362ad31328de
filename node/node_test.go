package node_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func chat(model, prompt string) *pb.QueryRequest {
	return &pb.QueryRequest{
		Type:     pb.QueryType_QUERY_TYPE_CHAT,
		Model:    model,
		Messages: []*pb.Message{{Role: "user", Content: prompt}},
	}
}

// ask runs one query and returns the text it streamed.
func ask(ctx context.Context, n *node.Node, req *pb.QueryRequest) (string, *router.Result, error) {
	var mu sync.Mutex
	var sb strings.Builder
	res, err := n.Router().Query(ctx, req, func(ev *pb.Event) error {
		mu.Lock()
		defer mu.Unlock()
		if ev == nil {
			sb.Reset()
			return nil
		}
		if c := ev.GetChunk(); c != nil {
			sb.WriteString(c.GetText())
		}
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	return sb.String(), res, err
}

func TestAnnouncementsReachEveryNode(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.Clients(1))
	workers := map[string]bool{}
	for _, w := range s.Workers {
		workers[w.ID().String()] = true
	}
	for _, n := range s.Nodes() {
		seen := 0
		for _, p := range n.Router().Peers() {
			if !workers[p.Peer] {
				continue
			}
			seen++
			if len(p.Models) != 1 || p.Models[0].Name != "demo" || len(p.Models[0].Types) != 6 {
				t.Errorf("%s sees %s with models %+v", n.ID().ShortString(), p.Peer, p.Models)
			}
			if p.MaxConcurrency == 0 || p.Health == 0 || p.Version == "" {
				t.Errorf("peer view lacks load/health/version: %+v", p)
			}
		}
		if seen != 3 {
			t.Errorf("%s sees %d of 3 workers", n.ID().ShortString(), seen)
		}
		models := n.Router().Models()
		if len(models) != 1 || models[0].Name != "demo" || models[0].Peers != 3 {
			t.Errorf("models = %+v", models)
		}
	}
}

func TestQueryStreamsFromAWorker(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var events []string
	res, err := s.Clients[0].Router().Query(ctx, chat("demo", "hello swarm"), func(ev *pb.Event) error {
		switch ev.GetKind().(type) {
		case *pb.Event_Accepted:
			events = append(events, "accepted")
		case *pb.Event_Chunk:
			events = append(events, "chunk")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(events) < 3 || events[0] != "accepted" || events[1] != "chunk" {
		t.Fatalf("events = %v, want accepted then several chunks", events)
	}
	if res.Local || (res.Peer != s.Workers[0].ID() && res.Peer != s.Workers[1].ID()) {
		t.Fatalf("answered by %s (local %v), want a worker", res.Peer, res.Local)
	}
	if res.Done.GetUsage().GetCompletionTokens() == 0 || res.Done.GetModel() != "demo" {
		t.Fatalf("done = %v", res.Done)
	}
}

func TestWorkerRoutesToItself(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1))
	w := s.Workers[0]
	text, res, err := ask(context.Background(), w, chat("demo", "local please"))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Local || res.Peer != w.ID() || !strings.Contains(text, "local please") {
		t.Fatalf("res = %+v text %q, want a local answer", res, text)
	}
}

func TestUnknownModelIsUnsupported(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	_, _, err := ask(context.Background(), s.Clients[0], chat("no-such-model", "hi"))
	pe := protocol.AsError(err)
	if pe == nil || pe.Code != protocol.CodeUnsupported || !strings.Contains(pe.Message, "no-such-model") || !strings.Contains(pe.Message, "chat") {
		t.Fatalf("err = %v, want UNSUPPORTED naming the model and type", err)
	}
}

func TestLeastLoadedWorkerAnswers(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.Clients(1), swarmtest.DemoDelay(20*time.Millisecond),
		swarmtest.NodeOptions(node.WithMaxConcurrency(4)))
	busy := s.Workers[0]
	// Fill the busy worker's slots with long local queries.
	ctx, cancel := context.WithCancel(context.Background())
	long := strings.Repeat("word ", 2000)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = busy.Worker().Serve(ctx, withID(chat("demo", long)), func(*pb.Event) error { return nil })
		}()
	}
	client := s.Clients[0]
	waitFor(t, 10*time.Second, func() bool {
		e, ok := client.Discovery().Table().Get(busy.ID())
		return ok && e.Announce.GetLoad().GetInFlight() == 4
	}, "client to see the busy worker's load")
	for i := 0; i < 20; i++ {
		_, res, err := ask(context.Background(), client, chat("demo", fmt.Sprint("q", i)))
		if err != nil {
			t.Fatal(err)
		}
		if res.Peer == busy.ID() {
			t.Fatalf("query %d went to the fully loaded worker (attempts %d); peers: %+v", i, res.Attempts, client.Router().Peers())
		}
	}
}

func withID(req *pb.QueryRequest) *pb.QueryRequest {
	req.Id = router.NewID()
	return req
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// run sends total queries at the given concurrency and counts answers per peer.
func run(t *testing.T, n *node.Node, total, conc int, during func(done int)) (map[peer.ID]int, []error) {
	t.Helper()
	var mu sync.Mutex
	counts := map[peer.ID]int{}
	var errs []error
	jobs := make(chan int)
	var wg sync.WaitGroup
	doneN := 0
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				ctx, cancel := context.WithTimeout(router.WithRestart(context.Background()), 60*time.Second)
				prompt := fmt.Sprintf("query number %d", i)
				text, res, err := ask(ctx, n, chat("demo", prompt))
				cancel()
				mu.Lock()
				switch {
				case err != nil:
					errs = append(errs, fmt.Errorf("query %d: %w", i, err))
				case !strings.HasSuffix(strings.TrimSpace(text), prompt) || strings.Count(text, "[demo answer") != 1:
					errs = append(errs, fmt.Errorf("query %d: bad answer %q", i, text))
				default:
					counts[res.Peer]++
				}
				doneN++
				d := doneN
				mu.Unlock()
				if during != nil {
					during(d)
				}
			}
		}()
	}
	for i := 0; i < total; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	return counts, errs
}

func TestLoadSpreadsAcrossEqualWorkers(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.Clients(1), swarmtest.DemoDelay(2*time.Millisecond))
	counts, errs := run(t, s.Clients[0], 300, 16, nil)
	for _, err := range errs {
		t.Error(err)
	}
	for p, c := range counts {
		if c > 180 {
			t.Errorf("worker %s took %d of 300 queries (> 60%%)", p.ShortString(), c)
		}
	}
	if len(counts) != 3 {
		t.Errorf("answers came from %d workers, want 3: %v", len(counts), counts)
	}
	t.Logf("distribution: %v", counts)
}

func TestFailoverWhenAWorkerDies(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.Clients(1), swarmtest.DemoDelay(3*time.Millisecond))
	victim := s.Workers[1]
	var once sync.Once
	counts, errs := run(t, s.Clients[0], 200, 8, func(done int) {
		if done >= 50 {
			once.Do(func() { go s.Kill(victim) })
		}
	})
	for _, err := range errs {
		t.Error(err)
	}
	total := 0
	for _, c := range counts {
		total += c
	}
	if total != 200 {
		t.Fatalf("%d of 200 queries answered", total)
	}
	// The dead worker leaves every table within a few heartbeats.
	s.WaitGone(victim, 3*time.Second)
	t.Logf("distribution: %v", counts)
}

func TestGracefulShutdownFinishesInFlightQueries(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1), swarmtest.DemoDelay(20*time.Millisecond))
	leaving, staying := s.Workers[0], s.Workers[1]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// A query running on the leaving worker, started in-process there.
	started := make(chan struct{})
	var once sync.Once
	type out struct {
		done *pb.Done
		err  error
	}
	res := make(chan out, 1)
	go func() {
		d, err := leaving.Worker().Serve(ctx, withID(chat("demo", strings.Repeat("w ", 50))), func(ev *pb.Event) error {
			if ev.GetChunk() != nil {
				once.Do(func() { close(started) })
			}
			return nil
		})
		res <- out{d, err}
	}()
	<-started
	shut := make(chan error, 1)
	go func() { shut <- leaving.Shutdown(ctx) }()

	// New queries are refused by the draining worker...
	waitFor(t, 5*time.Second, leaving.Worker().Draining, "drain")
	_, err := leaving.Worker().Serve(ctx, withID(chat("demo", "late")), func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBusy {
		t.Fatalf("query to a draining worker: %v, want BUSY", err)
	}
	// ...and the swarm answers them elsewhere.
	_, r, err := ask(ctx, s.Clients[0], chat("demo", "during shutdown"))
	if err != nil || r.Peer != staying.ID() {
		t.Fatalf("query during shutdown: peer %v err %v", r, err)
	}
	// The query in flight finished with a result before the node closed.
	o := <-res
	if o.err != nil || o.done == nil {
		t.Fatalf("in-flight query lost in shutdown: %v", o.err)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// TestNewWorkerIsSeenWithoutWaitingForAHeartbeat: with a heartbeat of a
// minute, a worker that joins later is in every table at once: it
// announces again as each peer joins its topic, and the mesh carries that
// announcement to the nodes it is not connected to.
func TestNewWorkerIsSeenWithoutWaitingForAHeartbeat(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2))
	late := s.AddWorker(node.WithAnnounceInterval(time.Minute))
	// Well inside one heartbeat: only join-triggered announcements count.
	waitFor(t, 20*time.Second, func() bool {
		for _, n := range s.Nodes() {
			if e, ok := n.Discovery().Table().Get(late.ID()); !ok || len(e.Announce.GetModels()) == 0 {
				return false
			}
		}
		return true
	}, "every node to see the new worker")
}

// TestStaleProviderRecordIsUnsupported: the DHT still names a worker that
// died; a query for its model ends with UNSUPPORTED naming model and type,
// not with a transport error.
func TestStaleProviderRecordIsUnsupported(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	w, client := s.Workers[0], s.Clients[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitFor(t, 20*time.Second, func() bool {
		ps, err := client.Discovery().FindProviders(ctx, "demo", 4)
		return err == nil && len(ps) > 0
	}, "the worker's provider record")
	s.Kill(w)
	s.WaitGone(w, 10*time.Second)
	_, _, err := ask(ctx, client, chat("demo", "anyone?"))
	pe := protocol.AsError(err)
	if pe == nil || pe.Code != protocol.CodeUnsupported || !strings.Contains(pe.Message, `"demo"`) || !strings.Contains(pe.Message, "chat") {
		t.Fatalf("err = %v, want UNSUPPORTED naming the model and type", err)
	}
	if strings.Contains(pe.Message, "127.0.0.1") || strings.Contains(pe.Message, "/ip4/") {
		t.Fatalf("error leaks an address: %v", pe)
	}
}

// TestLimitsBeyondAnAnnouncementAreRefused: a concurrency or queue that
// no announcement may carry (routers would refuse it, and the node would
// vanish from the swarm without a word) is an error at start.
func TestLimitsBeyondAnAnnouncementAreRefused(t *testing.T) {
	for _, opt := range []node.Option{node.WithMaxConcurrency(protocol.MaxAnnSlots + 1), node.WithMaxQueue(protocol.MaxAnnSlots + 1)} {
		n, err := node.New(t.Context(), node.WithDataDir(t.TempDir()), node.WithListenAddrs("/ip4/127.0.0.1/tcp/0"), node.WithMDNS(false), opt)
		if err == nil {
			n.Close()
			t.Fatal("a node started with limits beyond what it can announce")
		}
		if !strings.Contains(err.Error(), "what an announcement may carry") {
			t.Fatalf("error %v does not say why", err)
		}
	}
}
