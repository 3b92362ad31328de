package router

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"google.golang.org/protobuf/proto"
)

func jpt(j float32) func(*pb.Announce) {
	return func(a *pb.Announce) { a.Models[0].JoulesPerToken = j }
}

// ttftMs announces a p50 time to first token.
func ttftMs(ms uint32) func(*pb.Announce) {
	return func(a *pb.Announce) { a.Models[0].P50TtftMs = ms }
}

// withGPU announces one GPU: a worker that can measure its energy.
func withGPU(a *pb.Announce) { a.Gpus = []*pb.GPU{{Name: "gpu"}} }

// TestEnergyPreferenceOrder: with energy preferred, the lowest measured
// joules per token among the free workers within the latency slack goes
// first; without it (or outside the slack) expected latency decides.
func TestEnergyPreferenceOrder(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name  string
		table staticTable
		slack float64
		want  []string
		moved bool
	}{
		{"off: latency decides", staticTable{cand("fast", 0, 4, 100, 0, jpt(2)), cand("frugal", 0, 4, 100, 40*ms, jpt(0.5))}, 0,
			[]string{"fast", "frugal"}, false},
		{"frugal within slack wins", staticTable{cand("fast", 0, 4, 100, 0, jpt(2)), cand("frugal", 0, 4, 100, 40*ms, jpt(0.5))}, 1.5,
			[]string{"frugal", "fast"}, true},
		{"frugal outside slack loses", staticTable{cand("fast", 0, 4, 100, 0, jpt(2)), cand("frugal", 0, 4, 100, 300*ms, jpt(0.5))}, 1.5,
			[]string{"fast", "frugal"}, true},
		{"a wider slack reaches it", staticTable{cand("fast", 0, 4, 100, 0, jpt(2)), cand("frugal", 0, 4, 100, 300*ms, jpt(0.5))}, 5,
			[]string{"frugal", "fast"}, true},
		{"measured before unknown", staticTable{cand("unknown", 0, 4, 100, 0), cand("measured", 0, 4, 100, 20*ms, jpt(3))}, 1.5,
			[]string{"measured", "unknown"}, true},
		{"a few ms apart: within the slack whatever the ratio", staticTable{cand("fast", 0, 4, 100, 0, ttftMs(1), jpt(2)), cand("frugal", 0, 4, 100, 0, ttftMs(5), jpt(0.5))}, 1.5,
			[]string{"frugal", "fast"}, true},
		{"tens of ms apart: the ratio decides", staticTable{cand("fast", 0, 4, 100, 0, ttftMs(20), jpt(2)), cand("frugal", 0, 4, 100, 0, ttftMs(60), jpt(0.5))}, 1.5,
			[]string{"fast", "frugal"}, true},
		{"a GPU not yet measured is probed first", staticTable{cand("measured", 0, 4, 100, 0, jpt(1), withGPU), cand("new", 0, 4, 100, 20*ms, withGPU)}, 1.5,
			[]string{"new", "measured"}, true},
		{"a GPU outside the slack is not probed", staticTable{cand("measured", 0, 4, 100, 0, jpt(1), withGPU), cand("new", 0, 4, 100, 300*ms, withGPU)}, 1.5,
			[]string{"measured", "new"}, true},
		{"a full GPU is not probed", staticTable{cand("measured", 0, 4, 100, 0, jpt(1), withGPU), cand("new", 4, 4, 100, 0, withGPU)}, 1.5,
			[]string{"measured", "new"}, true},
		{"probed with nobody measured", staticTable{cand("cpu", 0, 4, 100, 0), cand("new", 0, 4, 100, 20*ms, withGPU)}, 1.5,
			[]string{"new", "cpu"}, true},
		{"nobody measured: latency decides", staticTable{cand("a", 0, 4, 100, 30*ms), cand("b", 0, 4, 100, 0)}, 1.5,
			[]string{"b", "a"}, false},
		{"a full worker stays behind", staticTable{cand("full", 4, 4, 100, 0, jpt(0.1)), cand("free", 0, 4, 100, 0, jpt(5))}, 1.5,
			[]string{"free", "full"}, true},
		{"three within slack by joules", staticTable{cand("j3", 0, 4, 100, 0, jpt(3)), cand("j1", 0, 4, 100, 10*ms, jpt(1)),
			cand("j2", 0, 4, 100, 20*ms, jpt(2)), cand("slow", 0, 4, 100, time.Second, jpt(0.1))}, 1.5,
			[]string{"j1", "j2", "j3", "slow"}, true},
	}
	h := testHost(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := New(h, "/test", tc.table)
			ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
			moved := r.byEnergy(ranked, "m", pb.QueryType_QUERY_TYPE_CHAT, tc.slack)
			var got []string
			for _, c := range ranked {
				got = append(got, string(c.Peer))
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") || moved != tc.moved {
				t.Fatalf("order = %v (pinned %v), want %v (pinned %v)", got, moved, tc.want, tc.moved)
			}
		})
	}
}

// TestAnnouncingLessEnergyThanReportedGainsNothing: a worker that
// announces a tiny joules per token but reports much more in its answers
// is ranked by what it reports.
func TestAnnouncingLessEnergyThanReportedGainsNothing(t *testing.T) {
	h := testHost(t)
	table := staticTable{cand("liar", 0, 4, 100, 0, jpt(1e-30)), cand("honest", 0, 4, 100, 10*time.Millisecond, jpt(1))}
	r := New(h, "/test", table)
	order := func() string {
		ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
		r.byEnergy(ranked, "m", pb.QueryType_QUERY_TYPE_CHAT, 1.5)
		return string(ranked[0].Peer)
	}
	if got := order(); got != "liar" {
		t.Fatalf("first %s before any answer, want the liar (its announcement is all there is)", got)
	}
	// Its answers report 50 J a token (1 000 J for 20 tokens).
	for range 3 {
		r.noteEnergy(peer.ID("liar"), "m", &pb.Done{Usage: &pb.Usage{CompletionTokens: 20}, EnergyMj: 1_000_000})
	}
	if got := order(); got != "honest" {
		t.Fatalf("first %s after the liar's answers reported 50 J a token, want the honest worker", got)
	}
}

// TestEnergyProbe: a worker with a GPU and no joules per token for the
// model is probed once per EnergyProbeEvery, again after that, and again
// at once after it restarts (a new process has measured nothing); once it
// announces a figure, the figure decides.
func TestEnergyProbe(t *testing.T) {
	h := testHost(t)
	measured := cand("measured", 0, 4, 100, 0, jpt(1), withGPU)
	fresh := cand("new", 0, 4, 100, 20*time.Millisecond, withGPU)
	table := &mutableTable{c: []Candidate{measured, fresh}}
	r := New(h, "/test", table)
	first := func() string {
		t.Helper()
		ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
		if !r.byEnergy(ranked, "m", pb.QueryType_QUERY_TYPE_CHAT, 1.5) {
			t.Fatal("energy did not decide")
		}
		return string(ranked[0].Peer)
	}
	steps := []struct {
		name string
		do   func()
		want string
	}{
		{"probed", func() {}, "new"},
		{"not again within the period", func() {}, "measured"},
		{"nor for a burst", func() {}, "measured"},
		{"again after the period", func() {
			r.mu.Lock()
			r.state("new").energyProbed["m"] = time.Now().Add(-EnergyProbeEvery - time.Second)
			r.mu.Unlock()
		}, "new"},
		{"restarted: probed at once", func() {
			for _, inc := range []uint64{1, 2} {
				c := fresh
				c.Announce = proto.Clone(fresh.Announce).(*pb.Announce)
				c.Announce.Incarnation = inc
				r.mu.Lock()
				r.noteIncarnationLocked(c, r.state("new"))
				r.mu.Unlock()
			}
		}, "new"},
		{"measured frugal: the figure decides", func() {
			table.set(measured, cand("new", 0, 4, 100, 20*time.Millisecond, jpt(0.5), withGPU))
		}, "new"},
		{"measured costly: the figure decides", func() {
			table.set(measured, cand("new", 0, 4, 100, 20*time.Millisecond, jpt(5), withGPU))
		}, "measured"},
	}
	for _, s := range steps {
		s.do()
		if got := first(); got != s.want {
			t.Fatalf("%s: first = %s, want %s", s.name, got, s.want)
		}
	}
}

func TestParseEnergyPreference(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    EnergyPreference
		wantErr bool
	}{
		{"", EnergyDefault, false},
		{"energy", EnergyPrefer, false},
		{" Energy ", EnergyPrefer, false},
		{"latency", EnergyIgnore, false},
		{"LATENCY", EnergyIgnore, false},
		{"cheap", EnergyDefault, true},
		{"energy,latency", EnergyDefault, true},
	} {
		got, err := ParseEnergyPreference(tc.in)
		if got != tc.want || (err != nil) != tc.wantErr || (err != nil && !errors.Is(err, ErrBadPreference)) {
			t.Errorf("ParseEnergyPreference(%q) = %v, %v; want %v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestEnergySlackFor(t *testing.T) {
	h := testHost(t)
	ctx := context.Background()
	tests := []struct {
		name string
		opts []Option
		ctx  context.Context
		want float64
	}{
		{"default off", nil, ctx, 0},
		{"node prefers", []Option{WithPreferEnergy(true, 0)}, ctx, DefaultEnergySlack},
		{"node slack", []Option{WithPreferEnergy(true, 2)}, ctx, 2},
		{"query prefers", nil, WithEnergyPreference(ctx, EnergyPrefer), DefaultEnergySlack},
		{"query ignores node", []Option{WithPreferEnergy(true, 2)}, WithEnergyPreference(ctx, EnergyIgnore), 0},
		{"query follows node", []Option{WithPreferEnergy(true, 3)}, WithEnergyPreference(ctx, EnergyDefault), 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := New(h, "/test", staticTable{}, tc.opts...).energySlackFor(tc.ctx); got != tc.want {
				t.Fatalf("slack = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestQueryPrefersEnergy runs real queries against two real workers on
// loopback: one announcing a fast p50 TTFT and 4 J/token, the other 2.5×
// slower and 1 J/token. Preferring energy with a slack of 3 (per node or
// per query) sends queries to the frugal one; ranking by latency (the
// default, or overriding the node per query) sends them to the fast one.
func TestQueryPrefersEnergy(t *testing.T) {
	const proto = "/mtor/test/query"
	h := testHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var workers []host.Host
	for range 2 {
		wh := testHost(t)
		w := worker.New([]backend.Backend{demo.New("demo", demo.WithDelay(0))})
		w.Refresh(ctx)
		wh.SetStreamHandler(proto, w.HandleStream)
		if err := h.Connect(ctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
			t.Fatal(err)
		}
		workers = append(workers, wh)
	}
	fast, frugal := workers[0].ID(), workers[1].ID()
	demoModel := func(a *pb.Announce) { a.Models[0].Name = "demo" }
	slow := func(a *pb.Announce) { a.Models[0].P50TtftMs = 250 }
	table := staticTable{
		cand(string(fast), 0, 4, 100, 0, demoModel, jpt(4)),
		cand(string(frugal), 0, 4, 100, 0, demoModel, slow, jpt(1)),
	}
	tests := []struct {
		name string
		opts []Option
		pref EnergyPreference
		want peer.ID
	}{
		{"default ranks by latency", nil, EnergyDefault, fast},
		{"node prefers energy", []Option{WithPreferEnergy(true, 3)}, EnergyDefault, frugal},
		{"query overrides the node", []Option{WithPreferEnergy(true, 3)}, EnergyIgnore, fast},
		{"query prefers energy", []Option{WithPreferEnergy(false, 3)}, EnergyPrefer, frugal},
		{"outside the default slack", []Option{WithPreferEnergy(true, 0)}, EnergyDefault, fast},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// A fresh router each time: what one measures of a peer
			// would change the next one's ranking.
			r := New(h, proto, table, append([]Option{WithSeed(1)}, tc.opts...)...)
			for i := range 5 {
				res, err := r.Query(WithEnergyPreference(ctx, tc.pref),
					&pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi"},
					func(*pb.Event) error { return nil })
				if err != nil {
					t.Fatal(err)
				}
				if res.Peer != tc.want {
					t.Fatalf("query %d answered by %s, want %s", i, res.Peer, tc.want)
				}
			}
		})
	}
}
