package router

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	mss "github.com/multiformats/go-multistream"

	"github.com/mtor-swarm/mtor/discovery/hostiletest"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type staticTable []Candidate

func (s staticTable) Candidates() []Candidate { return s }

func testHost(t testing.TB) host.Host {
	t.Helper()
	return testHostOn(t, "/ip4/127.0.0.1/tcp/0")
}

// transports are the default transports, for the tests that run over
// each.
var transports = []struct{ name, listen string }{
	{"tcp", "/ip4/127.0.0.1/tcp/0"},
	{"quic", "/ip4/127.0.0.1/udp/0/quic-v1"},
}

// testHostOn is a host listening on listen with opts, closed at the end.
func testHostOn(t testing.TB, listen string, opts ...libp2p.Option) host.Host {
	t.Helper()
	h, err := libp2p.New(append(opts, libp2p.ListenAddrStrings(listen))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func cand(id string, inFlight, maxC, health uint32, rtt time.Duration, mods ...func(*pb.Announce)) Candidate {
	a := &pb.Announce{
		Health: health,
		Load:   &pb.Load{InFlight: inFlight, MaxConcurrency: maxC},
		Models: []*pb.ModelInfo{{Name: "m", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, P50TtftMs: 100}},
	}
	for _, f := range mods {
		f(a)
	}
	return Candidate{Peer: peer.ID(id), Announce: a, RTT: rtt}
}

func TestRankOrdersByExpectedTimeToFirstToken(t *testing.T) {
	draining := func(a *pb.Announce) { a.Draining = true }
	otherModel := func(a *pb.Announce) { a.Models[0].Name = "other" }
	embedOnly := func(a *pb.Announce) { a.Models[0].Types = []pb.QueryType{pb.QueryType_QUERY_TYPE_EMBED} }
	tests := []struct {
		name  string
		table staticTable
		want  []string // peer order, best first
	}{
		{"idle beats loaded", staticTable{cand("loaded", 3, 4, 100, 0), cand("idle", 0, 4, 100, 0)}, []string{"idle", "loaded"}},
		{"full worker queues behind", staticTable{cand("full", 8, 4, 100, 0), cand("half", 2, 4, 100, 0)}, []string{"half", "full"}},
		{"near beats far", staticTable{cand("far", 0, 4, 100, 300*time.Millisecond), cand("near", 0, 4, 100, time.Millisecond)}, []string{"near", "far"}},
		{"healthy beats sick", staticTable{cand("sick", 0, 4, 30, 0), cand("well", 0, 4, 100, 0)}, []string{"well", "sick"}},
		{"bigger worker takes more load", staticTable{cand("small", 2, 2, 100, 0), cand("big", 2, 16, 100, 0)}, []string{"big", "small"}},
		{"a free slot beats a faster full worker", staticTable{cand("fullfast", 4, 4, 100, 0), cand("freeslow", 0, 4, 100, 300*time.Millisecond)}, []string{"freeslow", "fullfast"}},
		{"draining skipped", staticTable{cand("leaving", 0, 4, 100, 0, draining), cand("staying", 3, 4, 100, 0)}, []string{"staying"}},
		{"wrong model or type skipped", staticTable{cand("other", 0, 4, 100, 0, otherModel), cand("embed", 0, 4, 100, 0, embedOnly), cand("ok", 0, 4, 100, 0)}, []string{"ok"}},
	}
	h := testHost(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := New(h, "/test", tc.table)
			ranked, known := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
			var got []string
			for _, c := range ranked {
				got = append(got, string(c.Peer))
			}
			if !known || strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("order = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestOpenBreakerExcludesPeer(t *testing.T) {
	h := testHost(t)
	r := New(h, "/test", staticTable{cand("bad", 0, 4, 100, 0), cand("good", 2, 4, 100, 0)},
		WithHealthOptions(health.WithThreshold(2)))
	r.mu.Lock()
	st := r.state("bad")
	st.tracker.Record(health.Failure)
	st.tracker.Record(health.Failure)
	r.mu.Unlock()
	ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
	if len(ranked) != 1 || ranked[0].Peer != "good" {
		t.Fatalf("ranked = %v, want only good", ranked)
	}
	var view PeerView
	for _, v := range r.Peers() {
		if v.Peer == peer.ID("bad").String() {
			view = v
		}
	}
	if view.Breaker != "open" || view.LocalHealth >= 100 {
		t.Fatalf("peer view of the failing peer = %+v", view)
	}
}

func TestChoosePowerOfTwo(t *testing.T) {
	h := testHost(t)
	r := New(h, "/test", staticTable{}, WithSeed(7))
	close := []scored{{score: 100}, {score: 150}, {score: 1000}}
	seen := map[int]int{}
	for i := 0; i < 200; i++ {
		seen[r.choose(close)]++
	}
	if seen[0] == 0 || seen[1] == 0 || seen[2] != 0 {
		t.Fatalf("close scores: picks %v, want both of the best two and never the third", seen)
	}
	clear := []scored{{score: 100}, {score: 500}}
	for i := 0; i < 50; i++ {
		if r.choose(clear) != 0 {
			t.Fatal("a clearly better peer was passed over")
		}
	}
}

func TestNoCandidateIsUnsupported(t *testing.T) {
	h := testHost(t)
	req := func() *pb.QueryRequest {
		return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Prompt: "hi"}
	}
	tests := []struct {
		name  string
		table staticTable
		want  string
	}{
		{"nobody serves it", staticTable{}, `no peer in the swarm serves model "m" for chat`},
		{"all draining", staticTable{cand("leaving", 0, 4, 100, 0, func(a *pb.Announce) { a.Draining = true })}, "no available peer"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := New(h, "/test", tc.table)
			_, err := r.Query(context.Background(), req(), func(*pb.Event) error { return nil })
			pe := protocol.AsError(err)
			if pe == nil || pe.Code != protocol.CodeUnsupported || !strings.Contains(pe.Message, tc.want) {
				t.Fatalf("err = %v, want UNSUPPORTED containing %q", err, tc.want)
			}
		})
	}
}

func TestModelsAggregatesTypesAndPeers(t *testing.T) {
	h := testHost(t)
	vision := func(a *pb.Announce) {
		a.Models[0].Types = []pb.QueryType{pb.QueryType_QUERY_TYPE_VISION, pb.QueryType_QUERY_TYPE_CHAT}
	}
	r := New(h, "/test", staticTable{cand("a", 0, 4, 100, 0), cand("b", 0, 4, 100, 0, vision),
		cand("c", 0, 4, 100, 0, func(a *pb.Announce) { a.Draining = true })})
	ms := r.Models()
	if len(ms) != 1 || ms[0].Name != "m" || ms[0].Peers != 2 || strings.Join(ms[0].Types, ",") != "chat,vision" {
		t.Fatalf("models = %+v", ms)
	}
}

// TestFrozenWorkerIsSkipped: a worker that takes the stream and then says
// nothing (a frozen process) costs a query the accept timeout, not its
// deadline: the router moves on to the next candidate.
func TestFrozenWorkerIsSkipped(t *testing.T) {
	const proto = "/mtor/test/query"
	// fakeFrozenWorker stands in for a worker process stopped with SIGSTOP:
	// its connection is up, it never answers.
	frozen := testHost(t)
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	frozen.SetStreamHandler(proto, func(s network.Stream) { <-hold; s.Reset() })

	live := testHost(t)
	w := worker.New([]backend.Backend{demo.New("live", demo.WithDelay(0))})
	w.Refresh(context.Background())
	live.SetStreamHandler(proto, w.HandleStream)

	h := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, o := range []host.Host{frozen, live} {
		if err := h.Connect(ctx, peer.AddrInfo{ID: o.ID(), Addrs: o.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	demoModel := func(a *pb.Announce) { a.Models[0].Name = "demo" }
	table := staticTable{
		cand(string(frozen.ID()), 0, 4, 100, 0, demoModel),                  // looks best
		cand(string(live.ID()), 0, 4, 100, 500*time.Millisecond, demoModel), // clearly worse
	}
	r := New(h, proto, table, WithAcceptTimeout(300*time.Millisecond))
	res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "anyone there?"},
		func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if res.Peer != live.ID() || res.Attempts != 2 {
		t.Fatalf("answered by %s after %d attempts, want the live worker after 2", res.Peer, res.Attempts)
	}
	if res.PeerString() != live.ID().String() { // kept per peer: the one that answered, not the one tried first
		t.Fatalf("answer names %s, want %s", res.PeerString(), live.ID())
	}
	for _, v := range r.Peers() {
		if v.Peer == frozen.ID().String() && v.LocalHealth >= 100 {
			t.Fatal("the frozen worker kept full health")
		}
	}
}

// TestUnmeasuredPeerGetsTried: a peer the router has not measured yet is
// assumed as fast as the measured ones, so it is not starved by a peer
// that happened to answer first.
func TestUnmeasuredPeerGetsTried(t *testing.T) {
	noP50 := func(a *pb.Announce) { a.Models[0].P50TtftMs = 0 }
	r := New(testHost(t), "/test", staticTable{cand("measured", 0, 4, 100, 0, noP50), cand("new", 0, 4, 100, 0, noP50)}, WithSeed(3))
	r.mu.Lock()
	st := r.state("measured")
	st.ttft, st.service = 2, 3
	r.mu.Unlock()
	picks := map[peer.ID]int{}
	for i := 0; i < 100; i++ {
		ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
		picks[ranked[r.choose(ranked)].Peer]++
	}
	if picks["new"] == 0 || picks["measured"] == 0 {
		t.Fatalf("picks %v: both peers should get queries", picks)
	}
}

func TestPeersListsWorkersOnly(t *testing.T) {
	bootstrap := Candidate{Peer: "boot", Announce: &pb.Announce{Roles: []string{"bootstrap"}, Health: 100}}
	r := New(testHost(t), "/test", staticTable{bootstrap, cand("w", 1, 4, 100, 0)})
	ps := r.Peers()
	if len(ps) != 1 || ps[0].Peer != peer.ID("w").String() || ps[0].Roles == nil {
		t.Fatalf("peers = %+v, want only the worker, with non-nil roles", ps)
	}
}

// staticFinder is a one-entry address book standing in for the DHT.
type staticFinder struct{ ai peer.AddrInfo }

func (f staticFinder) FindPeer(_ context.Context, p peer.ID) (peer.AddrInfo, error) {
	if p != f.ai.ID {
		return peer.AddrInfo{}, errors.New("not found")
	}
	return f.ai, nil
}

// TestWorkerKnownOnlyFromGossipIsFound: a worker in the table whose
// addresses this node never learnt (it heard of it through gossip relayed
// by others) is looked up and reached.
func TestWorkerKnownOnlyFromGossipIsFound(t *testing.T) {
	const proto = "/mtor/test/query"
	live := demoWorkerHost(t, proto, "live")
	h := testHost(t) // never connected to live, no addresses for it
	demoModel := func(a *pb.Announce) { a.Models[0].Name = "demo" }
	table := staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req := func() *pb.QueryRequest {
		return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}
	}
	if _, err := New(h, proto, table).Query(ctx, req(), func(*pb.Event) error { return nil }); err == nil {
		t.Fatal("reached a peer with no known address and no way to find it")
	}
	r := New(testHost(t), proto, table, WithPeerFinder(staticFinder{peer.AddrInfo{ID: live.ID(), Addrs: live.Addrs()}}))
	if _, err := r.Query(ctx, req(), func(*pb.Event) error { return nil }); err != nil {
		t.Fatalf("worker not found through the peer finder: %v", err)
	}
}

// demoWorkerHost is a host serving a demo backend's model on proto.
func demoWorkerHost(t *testing.T, proto libp2pproto.ID, model string) host.Host {
	t.Helper()
	h := testHost(t)
	w := worker.New([]backend.Backend{demo.New(model, demo.WithDelay(0))})
	w.Refresh(context.Background())
	h.SetStreamHandler(proto, w.HandleStream)
	return h
}

// topicLearner finds no provider record, but the model's topic brings a
// worker to the table during the look-up, as discovery's FindProviders
// reports on a node without the swarm view.
type topicLearner struct {
	table *mutableTable
	learn Candidate
}

func (l topicLearner) FindProviders(context.Context, string, int) ([]peer.AddrInfo, error) {
	l.table.set(l.learn)
	return nil, nil
}

// A worker the table learns while the router looks the model's providers
// up takes the query, rather than the query failing UNSUPPORTED.
func TestWorkerLearntDuringLookUpAnswers(t *testing.T) {
	const proto = "/mtor/test/query"
	live := demoWorkerHost(t, proto, "demo")
	h := testHost(t)
	h.Peerstore().AddAddrs(live.ID(), live.Addrs(), time.Hour)
	table := &mutableTable{}
	learnt := cand(string(live.ID()), 0, 4, 100, 0, func(a *pb.Announce) { a.Models[0].Name = "demo" })
	r := New(h, proto, table, WithProviders(topicLearner{table, learnt}))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatalf("query with its worker learnt during the look-up: %v", err)
	}
	if res.Peer != live.ID() {
		t.Fatalf("answered by %s, want the learnt worker %s", res.Peer, live.ID())
	}
}

// brokenModel is a fake backend whose one model always fails, as a model
// server does for a model it cannot load.
type brokenModel struct{ *demo.Backend }

func (brokenModel) Run(context.Context, *pb.QueryRequest, backend.Sink) (backend.Usage, error) {
	return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "model failed to load")
}

// TestWorkerReportedErrorsDoNotTripThePeer: errors a worker reports itself
// (its backend failed) must not open the router's breaker for the whole
// peer; they open its breaker for that model (3 in a row), with back-off,
// which moves the model's queries to other peers; with none other, the
// peer is still tried, and its own error is what the client reads.
func TestWorkerReportedErrorsDoNotTripThePeer(t *testing.T) {
	const proto = "/mtor/test/query"
	live := testHost(t)
	w := worker.New([]backend.Backend{brokenModel{demo.New("w")}})
	w.Refresh(context.Background())
	live.SetStreamHandler(proto, w.HandleStream)
	h := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := h.Connect(ctx, peer.AddrInfo{ID: live.ID(), Addrs: live.Addrs()}); err != nil {
		t.Fatal(err)
	}
	demoModel := func(a *pb.Announce) { a.Models[0].Name = "demo" }
	r := New(h, proto, staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)})
	for i := 0; i < 5; i++ {
		_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "x"}, func(*pb.Event) error { return nil })
		want := protocol.CodeBackendError
		if pe := protocol.AsError(err); pe == nil || pe.Code != want {
			t.Fatalf("query %d: err = %v, want %s", i, err, want)
		}
	}
	if v := r.Peers()[0]; v.Breaker != "closed" || v.LocalHealth != 100 {
		t.Fatalf("peer view %+v: a worker's own errors tripped the peer", v)
	}
}

// poisoned fails the queries whose prompt names poison, as a model
// server does for a prompt it cannot take (a 500 on one input), and
// answers the rest.
type poisoned struct{ *demo.Backend }

func (b poisoned) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if strings.Contains(req.GetPrompt(), "poison") {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend answered 500: internal error")
	}
	return b.Backend.Run(ctx, req, out)
}

// TestOnePromptDoesNotShutAModelForEveryone: a client sending prompts
// that make the only worker's backend fail opens the router's breaker
// for that worker's model (at the first failure here); the other
// clients' queries still reach it and are answered. With a second worker
// the breaker moves them there.
func TestOnePromptDoesNotShutAModelForEveryone(t *testing.T) {
	for _, tc := range []struct {
		name   string
		second bool
	}{{"only worker", false}, {"with another worker", true}} {
		t.Run(tc.name, func(t *testing.T) {
			bad := backendWorkerOn(t, "/ip4/127.0.0.1/tcp/0", poisoned{demo.New("poisoned")})
			h := testHost(t)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			demoModel := func(a *pb.Announce) { a.Models[0].Name = "demo" }
			table := staticTable{cand(string(bad.ID()), 0, 4, 100, 0, demoModel)}
			hosts := []host.Host{bad}
			if tc.second {
				good := demoWorker(t, "good", 0)
				hosts = append(hosts, good)
				table = append(table, cand(string(good.ID()), 0, 4, 100, time.Second, demoModel))
			}
			for _, o := range hosts {
				if err := h.Connect(ctx, peer.AddrInfo{ID: o.ID(), Addrs: o.Addrs()}); err != nil {
					t.Fatal(err)
				}
			}
			// The worker's own breaker for its backend opens at 3 in a
			// row; the router's for the model at 1, so that it opens alone.
			r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithHealthOptions(health.WithThreshold(1)))
			if _, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "poison"}, func(*pb.Event) error { return nil }); err == nil && !tc.second {
				t.Fatal("the poisoned prompt was answered")
			}
			for i := range 3 {
				res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
				if err != nil {
					t.Fatalf("query %d of another client, after the poisoned ones: %v", i, err)
				}
				if tc.second && res.Peer == bad.ID() {
					t.Fatalf("query %d went to the worker whose breaker for the model is open, though another serves it", i)
				}
			}
		})
	}
}

// fixedProviders answers every look-up with the same provider records.
type fixedProviders []peer.AddrInfo

func (f fixedProviders) FindProviders(context.Context, string, int) ([]peer.AddrInfo, error) {
	return f, nil
}

// A query whose only candidates come from provider records fails
// UNSUPPORTED when no provider could be reached (the records outlived
// their workers), but UNAVAILABLE, retryable, when a provider was reached
// and failed it: it serves the model. Before, both were UNSUPPORTED, and a
// worker too slow to accept over a lossy link read as a model nobody has.
func TestProviderFailureCodes(t *testing.T) {
	const proto = "/mtor/test/query"
	frozen := testHost(t)
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	frozen.SetStreamHandler(proto, func(s network.Stream) { <-hold; s.Reset() })
	gone := testHost(t)
	goneInfo := peer.AddrInfo{ID: gone.ID(), Addrs: gone.Addrs()}
	if err := gone.Close(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		providers fixedProviders
		code      pb.ErrorCode
		says      string
	}{
		{"record of a dead worker", fixedProviders{goneInfo}, protocol.CodeUnsupported, "none reachable"},
		{"a frozen worker", fixedProviders{{ID: frozen.ID(), Addrs: frozen.Addrs()}}, protocol.CodeUnavailable, "did not answer"},
		{"both", fixedProviders{goneInfo, {ID: frozen.ID(), Addrs: frozen.Addrs()}}, protocol.CodeUnavailable, "did not answer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(testHost(t), proto, staticTable{}, WithProviders(tc.providers), WithAcceptTimeout(300*time.Millisecond))
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "anyone?"}, func(*pb.Event) error { return nil })
			pe := protocol.AsError(err)
			if pe == nil || pe.Code != tc.code || !strings.Contains(pe.Message, tc.says) {
				t.Fatalf("err = %v, want %v saying %q", err, tc.code, tc.says)
			}
		})
	}
}

// A dial that failed moments before (discovery's, over a lossy link) puts
// the worker in the swarm's dial back-off; a query dials for itself
// rather than fail on it "could not be reached".
func TestQueryDialsDespiteAnotherDialsBackoff(t *testing.T) {
	const proto = "/mtor/test/query"
	g := &hostiletest.Refuser{}
	g.Refuse(1)
	wh := testHostOn(t, "/ip4/127.0.0.1/tcp/0", libp2p.ConnectionGater(g))
	w := worker.New([]backend.Backend{demo.New("demo", demo.WithDelay(0))})
	w.Refresh(context.Background())
	wh.SetStreamHandler(proto, w.HandleStream)
	h := testHost(t)
	ai := peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}
	if err := h.Connect(context.Background(), ai); err == nil {
		t.Fatal("the first dial got through the refusing gater")
	}
	h.Peerstore().AddAddrs(wh.ID(), wh.Addrs(), time.Hour)
	r := New(h, proto, staticTable{cand(string(wh.ID()), 0, 4, 100, 0, func(a *pb.Announce) { a.Models[0].Name = "demo" })})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatalf("query right after another dial failed: %v", err)
	}
	if res.Peer != wh.ID() || res.Attempts != 1 {
		t.Fatalf("answered by %s after %d attempts, want the worker at the first", res.Peer, res.Attempts)
	}
}

// brokenFor is a backend whose one model always fails with an error
// status its server answered.
type brokenFor struct{ *demo.Backend }

func (brokenFor) Run(context.Context, *pb.QueryRequest, backend.Sink) (backend.Usage, error) {
	return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend answered 500: broken")
}

// TestEveryLastResortIsTried: with every worker of a model banned from it,
// a query tries them in turn, as it would workers in good standing: the
// first failing does not end it while another could answer.
func TestEveryLastResortIsTried(t *testing.T) {
	a := backendWorkerOn(t, "/ip4/127.0.0.1/tcp/0", brokenFor{demo.New("a")})
	b := backendWorkerOn(t, "/ip4/127.0.0.1/tcp/0", poisoned{demo.New("b")})
	h := testHost(t)
	connect(t, h, a, b)
	table := staticTable{cand(string(a.ID()), 0, 4, 100, 0, demoModel), cand(string(b.ID()), 0, 4, 100, time.Second, demoModel)}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithHealthOptions(health.WithThreshold(1)))
	// Both fail the poisoned prompt: both are banned from the model.
	if _, err := r.Query(t.Context(), chat("poison"), func(*pb.Event) error { return nil }); err == nil {
		t.Fatal("the poisoned prompt was answered")
	}
	res, err := r.Query(t.Context(), chat("hello"), func(*pb.Event) error { return nil })
	if err != nil {
		t.Fatalf("hello failed although b serves it: %v", err)
	}
	if res.Peer != b.ID() || res.Attempts != 2 {
		t.Fatalf("answered by %s in %d attempts, want b in 2", res.Peer, res.Attempts)
	}
}

// TestQueueStepsOfAProviderAreProgress: a worker found through the DHT
// (no announcement, so no announced queue) that steps forward in its
// queue within the stall bound is making progress, not stuck.
func TestQueueStepsOfAProviderAreProgress(t *testing.T) {
	var tried atomic.Bool
	queued := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		tried.Store(true)
		defer s.Close()
		for pos := uint32(4); ; pos-- {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: pos, HeartbeatMs: 250}}})
			if pos == 0 {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "queued answer"}}})
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{FinishReason: protocol.FinishStop, Usage: &pb.Usage{CompletionTokens: 2}}}})
	})
	other := demoWorker(t, "other", 0)
	h := testHost(t)
	connect(t, h, queued, other)
	r := New(h, testProto, staticTable{}, WithProviders(fixedProviders{{ID: queued.ID(), Addrs: queued.Addrs()}, {ID: other.ID(), Addrs: other.Addrs()}}),
		WithRetryBackoff(time.Millisecond), WithStallTimeout(400*time.Millisecond))
	// The router picks among the providers: ask until it has tried the
	// queued one, which must then answer.
	for range 20 {
		tried.Store(false)
		res, err := r.Query(t.Context(), chat("hi"), func(*pb.Event) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		if !tried.Load() {
			continue
		}
		if res.Peer != queued.ID() {
			t.Fatalf("answered by another worker after %d attempts: the queued one, stepping every 250 ms within a 400 ms stall bound, was failed as stuck", res.Attempts)
		}
		return
	}
	t.Fatal("the queued worker was never tried in 20 queries")
}

// TestQueueStepsAloneHoldAQueryAFewStallPeriods: a worker (found
// through the DHT, so it may queue up to 2 × 16 384 queries) that steps
// forward in its queue within every stall period but never answers, as a
// liar counting down thousands of positions does, holds a query
// queueStalls stall periods at most while another worker could take it:
// the query moves there, not to its deadline. Alone, the same steps hold
// the query until the queue's answer comes. On TCP and QUIC (whose
// streams fail a read past its deadline before handing over what was
// buffered).
func TestQueueStepsAloneHoldAQueryAFewStallPeriods(t *testing.T) {
	const stall, step = 400 * time.Millisecond, 100 * time.Millisecond
	for _, tr := range transports {
		for _, tc := range []struct {
			name  string
			alone bool
			steps uint32 // then it answers
		}{
			{name: "another could take it", steps: 30_000},
			{name: "alone", alone: true, steps: 25},
		} {
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				var tried atomic.Bool
				queued := fakeWorkerOn(t, tr.listen, func(s network.Stream, _ *pb.QueryRequest) {
					tried.Store(true)
					defer s.Close()
					for pos := tc.steps; ; pos-- {
						if protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: pos, HeartbeatMs: 100}}}) != nil {
							return
						}
						if pos == 0 {
							break
						}
						time.Sleep(step)
					}
					_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "queued answer"}}})
					_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{FinishReason: protocol.FinishStop, Usage: &pb.Usage{CompletionTokens: 2}}}})
				})
				h := testHostOn(t, tr.listen)
				providers := fixedProviders{{ID: queued.ID(), Addrs: queued.Addrs()}}
				if !tc.alone {
					other := demoWorkerOn(t, tr.listen, "other", 0)
					connect(t, h, other)
					providers = append(providers, peer.AddrInfo{ID: other.ID(), Addrs: other.Addrs()})
				}
				connect(t, h, queued)
				r := New(h, testProto, staticTable{}, WithProviders(providers), WithRetryBackoff(time.Millisecond), WithStallTimeout(stall))
				for range 20 {
					tried.Store(false)
					// Well short of the 50 min the steps would take.
					ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
					defer cancel()
					start := time.Now()
					res, err := r.Query(ctx, chat("hi"), func(*pb.Event) error { return nil })
					took := time.Since(start)
					if err != nil {
						t.Fatalf("after %s: %v", took, err)
					}
					if !tried.Load() {
						continue
					}
					if tc.alone {
						if res.Peer != queued.ID() || res.Attempts != 1 {
							t.Fatalf("answered by %s in %d attempts, want the queued worker, the only one, in 1", res.Peer, res.Attempts)
						}
						// One wait a period (2.5 s of steps, 400 ms periods),
						// not a spin on a deadline already past.
						if n := r.waitedOn.Load(); n > 2*int64(time.Duration(tc.steps)*step/stall)+2 {
							t.Fatalf("waited on %d times for %d periods", n, time.Duration(tc.steps)*step/stall)
						}
						return
					}
					if res.Peer == queued.ID() || res.Attempts != 2 {
						t.Fatalf("answered by %s in %d attempts after %s, want the other worker in 2", res.Peer, res.Attempts, took)
					}
					// A queue that held one query holds the next: the
					// free worker goes first for a while (heldFirst).
					tried.Store(false)
					for i := range 10 {
						res, err := r.Query(ctx, chat("hi"), func(*pb.Event) error { return nil })
						if err != nil || tried.Load() {
							t.Fatalf("query %d after the hold: %v, tried the holding worker %v", i, err, tried.Load())
						}
						if res.Attempts != 1 {
							t.Fatalf("query %d after the hold took %d attempts", i, res.Attempts)
						}
					}
					return
				}
				t.Fatal("the queued worker was never tried in 20 queries")
			})
		}
	}
}

// TestHeldQueueRanksLast: a worker whose queue held a query past
// queueStalls (failQueued, or failQueueLie, which its breaker records
// too) ranks after the free workers for heldFirst, doubled for each
// hold in a row up to heldMost, yet stays a refuge for a stalled query;
// an answer ends the row, and a failure of another kind neither starts
// nor ends it.
func TestHeldQueueRanksLast(t *testing.T) {
	held := peerFailure{kind: failQueued, err: protocol.Errorf(protocol.CodeUnavailable, "held")}
	stalled := peerFailure{kind: failStalled, err: protocol.Errorf(protocol.CodeUnavailable, "stalled")}
	lie := peerFailure{kind: failQueueLie, err: protocol.Errorf(protocol.CodeUnavailable, "lie")}
	type step struct {
		err    error
		output bool          // an answer with output (err nil)
		want   time.Duration // heldUntil after end; 0: not full
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"one hold", []step{{err: held, want: heldFirst}}},
		{"holds in a row double", []step{{err: held, want: heldFirst}, {err: held, want: 2 * heldFirst}, {err: held, want: 4 * heldFirst}}},
		{"to a bound", []step{{err: held}, {err: held}, {err: held}, {err: held}, {err: held}, {err: held, want: heldMost}, {err: held, want: heldMost}}},
		{"an answer ends the row", []step{{err: held}, {err: held}, {output: true, want: 2 * heldFirst}, {err: held, want: heldFirst}}},
		{"an answer without output does not", []step{{err: held}, {output: false, want: heldFirst}, {err: held, want: 2 * heldFirst}}},
		{"a stall is not a hold", []step{{err: stalled}}},
		{"a queue lie holds too", []step{{err: lie, want: heldFirst}, {err: held, want: 2 * heldFirst}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cand("w", 0, 4, 100, 0)
			other := cand("x", 0, 4, 100, 0)
			r := New(testHost(t), testProto, staticTable{c, other})
			end := time.Now()
			for i, s := range tc.steps {
				r.mu.Lock()
				st := r.state(c.Peer)
				var first time.Time
				if s.output {
					first = end
				}
				r.recordLocked(st, c, "m", s.err, first, end.Add(-time.Second), end)
				got := st.heldUntil.Sub(end)
				blamed := st.tracker.Score() < 100
				r.mu.Unlock()
				if wantBlame := s.err == lie || s.err == stalled; blamed != wantBlame && i == 0 {
					t.Fatalf("step %d: health %v after %v", i, blamed, s.err)
				}
				if s.want != 0 && got != s.want {
					t.Fatalf("step %d: full for %s, want %s", i, got, s.want)
				}
				if s.want == 0 && i == len(tc.steps)-1 && got > 0 {
					t.Fatalf("step %d: full for %s, want not held", i, got)
				}
				// Held, it ranks after a free worker, but a query
				// stalled elsewhere may still move to it: its slots
				// are free.
				rk := r.rankNeed("m", pb.QueryType_QUERY_TYPE_CHAT, nil)
				if len(rk.ranked) != 2 || (got > 0 && (rk.ranked[1].Peer != c.Peer || !rk.ranked[1].held)) ||
					(got <= 0 && (rk.ranked[0].held || rk.ranked[1].held)) {
					t.Fatalf("step %d: ranked %v, held for %s", i, rk.ranked, got)
				}
				q := &query{req: &pb.QueryRequest{Model: "m", Type: pb.QueryType_QUERY_TYPE_CHAT}, tried: map[tryKey]bool{}}
				if o := r.others(q, scored{Candidate: other}); len(o) != 1 || o[0].Peer != c.Peer {
					t.Fatalf("step %d: a query stalled on the other worker could move to %v", i, o)
				}
			}
		})
	}
}

// TestLastResortWithTheFeature: a tools query whose only worker with
// tools is banned from the model goes to that worker, not to a feature
// error because the other worker lacks tools.
func TestLastResortWithTheFeature(t *testing.T) {
	tools := func(a *pb.Announce) { a.Models[0].Features = []string{protocol.FeatureTools} }
	r := New(testHost(t), testProto, staticTable{cand("a", 0, 4, 100, 0, tools), cand("b", 0, 4, 100, 0)}, WithHealthOptions(health.WithThreshold(1)))
	r.mu.Lock()
	r.modelTrackerLocked(r.state("a"), "m").Record(health.Failure) // banned from m
	r.mu.Unlock()
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Prompt: "x", Tools: []*pb.Tool{{Name: "f"}}}
	rk, err := r.rankFor(req, protocol.RequiredFeatures(req))
	if err != nil {
		t.Fatalf("rank: %v, want the banned worker with tools as the last resort", err)
	}
	if len(rk.ranked) != 0 || len(rk.lastResort) != 1 || rk.lastResort[0].Peer != "a" {
		t.Fatalf("ranked %v, last resort %v; want none, then a", rk.ranked, rk.lastResort)
	}
}

// TestQueueLie: a queue position its worker's announcement cannot
// explain (more ahead than it announced queued, plus its concurrency,
// plus queueSlack) marks a liar; a busy worker's is plausible, and a
// worker found through the DHT announced nothing to contradict.
func TestQueueLie(t *testing.T) {
	load := func(queued, conc uint32) scored {
		return scored{Candidate: Candidate{Announce: &pb.Announce{Load: &pb.Load{Queued: queued, MaxConcurrency: conc, MaxQueue: 16384}}}}
	}
	for _, tc := range []struct {
		name string
		c    scored
		pos  uint32
		lie  bool
	}{
		{"idle, first in line", load(0, 4), 1, false},
		{"busy as announced", load(40, 4), 44, false},
		{"busier than announced, within the slack", load(10, 4), 10 + 4 + queueSlack, false},
		{"announced idle, 65 536 ahead", load(0, 16384), 65536, true},
		{"announced idle, past the slack", load(0, 4), 4 + queueSlack + 1, true},
		{"no announcement", scored{}, 65536, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := queueLie(tc.c, tc.pos); got != tc.lie {
				t.Fatalf("queueLie at %d = %v, want %v", tc.pos, got, tc.lie)
			}
		})
	}
}

// TestPingAnswered: a ping the peer reset or refused, or one a resource
// limit kept from opening, shows a live peer; a timeout does not.
func TestPingAnswered(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		alive bool
	}{
		{"reset by the peer", &network.StreamError{ErrorCode: 0, Remote: true}, true},
		{"at a resource limit", fmt.Errorf("open: %w", network.ErrResourceLimitExceeded), true},
		{"protocol refused", mss.ErrNotSupported[libp2pproto.ID]{Protos: []libp2pproto.ID{"/ipfs/ping/1.0.0"}}, true},
		{"timed out", context.DeadlineExceeded, false},
		{"reset here", &network.StreamError{ErrorCode: 0, Remote: false}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := pingAnswered(tc.err); got != tc.alive {
				t.Fatalf("pingAnswered(%v) = %v, want %v", tc.err, got, tc.alive)
			}
		})
	}
}

// TestStalledQueriesShareOnePing: queries that stall at once ask whether
// the same rival lives with one ping, which outlives the query that
// started it; a rival that never answers fails them all in one ping.
func TestStalledQueriesShareOnePing(t *testing.T) {
	const callers = 16
	for _, tr := range transports {
		for _, frozen := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/frozen=%v", tr.name, frozen), func(t *testing.T) {
				h, rival := testHostOn(t, tr.listen), testHostOn(t, tr.listen)
				var streams atomic.Int32
				rival.SetStreamHandler(ping.ID, func(s network.Stream) {
					streams.Add(1)
					defer s.Close()
					buf := make([]byte, ping.PingSize)
					for {
						if _, err := io.ReadFull(s, buf); err != nil {
							return
						}
						if frozen {
							continue
						}
						time.Sleep(300 * time.Millisecond) // the others ask meanwhile
						if _, err := s.Write(buf); err != nil {
							return
						}
					}
				})
				connect(t, h, rival)
				r := New(h, testProto, staticTable{})
				o := scored{Candidate: Candidate{Peer: rival.ID()}}
				// The first caller's query ends before the answer.
				first, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
				defer cancel()
				alive := make(chan bool, callers)
				for i := range callers {
					ctx := t.Context()
					if i == 0 {
						ctx = first
					}
					go func() {
						ok, _ := r.answersPing(ctx, o)
						if i > 0 {
							alive <- ok
						}
					}()
					if i == 0 {
						time.Sleep(10 * time.Millisecond) // it starts the ping
					}
				}
				for range callers - 1 {
					if ok := <-alive; ok == frozen {
						t.Fatalf("answered %v by a rival frozen=%v", ok, frozen)
					}
				}
				if n := streams.Load(); n != 1 {
					t.Fatalf("%d ping streams for %d stalled queries, want 1", n, callers)
				}
			})
		}
	}
}

// TestHeldRanksBetweenFreeAndFull: a held worker (its queue held a query
// lately, its slots free) goes after a free worker and before a full one
// that scores better (healthier), and the draw between the two best never picks
// across the tiers.
func TestHeldRanksBetweenFreeAndFull(t *testing.T) {
	free, held, fullW := cand("free", 0, 4, 5, 0), cand("held", 0, 4, 5, 0), cand("full", 4, 4, 100, 0)
	for _, tc := range []struct {
		name  string
		table staticTable
		want  []peer.ID
	}{
		{"all three", staticTable{fullW, held, free}, []peer.ID{"free", "held", "full"}},
		{"held and full", staticTable{fullW, held}, []peer.ID{"held", "full"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(testHost(t), testProto, tc.table)
			r.mu.Lock()
			r.state("held").heldUntil = time.Now().Add(time.Minute)
			r.mu.Unlock()
			rk := r.rankNeed("m", pb.QueryType_QUERY_TYPE_CHAT, nil)
			score := map[peer.ID]float64{}
			for _, c := range rk.ranked {
				score[c.Peer] = c.score
			}
			if score["full"] >= score["held"] {
				t.Fatalf("the full worker scores %.0f, the held one %.0f: the case shows nothing", score["full"], score["held"])
			}
			var got []peer.ID
			for _, c := range rk.ranked {
				got = append(got, c.Peer)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("ranked %v, want %v", got, tc.want)
			}
			for range 50 {
				if i := r.choose(rk.ranked); i != 0 {
					t.Fatalf("chose %s over %s", rk.ranked[i].Peer, rk.ranked[0].Peer)
				}
			}
		})
	}
}
