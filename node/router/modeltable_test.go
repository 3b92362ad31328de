package router

import (
	"cmp"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// swarmTable stands for a swarm view's peer table: n workers spread over
// some models, each read a fresh sorted copy, as discovery's Snapshot and
// SnapshotModel give. It counts the whole-table reads.
type swarmTable struct {
	all     []Candidate
	byModel map[string][]Candidate
	whole   atomic.Int64
}

func newSwarmTable(workers, models int) *swarmTable {
	st := &swarmTable{byModel: map[string][]Candidate{}}
	for i := range workers {
		m := fmt.Sprintf("model-%d", i%models)
		c := cand(fmt.Sprintf("w%05d", i), uint32(i%3), 4, 100, time.Duration(1+i%7)*time.Millisecond, func(a *pb.Announce) { a.Models[0].Name = m })
		st.all = append(st.all, c)
		st.byModel[m] = append(st.byModel[m], c)
	}
	return st
}

func sortedCopy(cs []Candidate) []Candidate {
	out := slices.Clone(cs)
	slices.SortFunc(out, func(a, b Candidate) int { return cmp.Compare(a.Peer, b.Peer) })
	return out
}

func (s *swarmTable) Candidates() []Candidate {
	s.whole.Add(1)
	return sortedCopy(s.all)
}

func (s *swarmTable) ModelCandidates(model string) []Candidate {
	return sortedCopy(s.byModel[model])
}

// A router over a ModelTable routes on the query's model's candidates
// alone, and decides as one that scans the whole table: same ranking,
// same model view, same canaries. The whole table is read only to prune,
// at most once per pruneEvery.
func TestModelTableReadsOneModel(t *testing.T) {
	st := newSwarmTable(1000, 50)
	h := testHost(t)
	byModel, byScan := New(h, "/test", st), New(h, "/test", wholeOnly{st})
	const chat = pb.QueryType_QUERY_TYPE_CHAT
	for i := range 100 {
		m := fmt.Sprintf("model-%d", i%50)
		got, known := byModel.rank(m, chat)
		want, _ := byScan.rank(m, chat)
		if !known || len(got) != 20 || !slices.EqualFunc(got, want, func(a, b scored) bool { return a.Peer == b.Peer && a.score == b.score }) {
			t.Fatalf("%s: ranked %d (known %v), not as the whole table's %d", m, len(got), known, len(want))
		}
		if mv, ok := byModel.Model(m); !ok || mv.Peers != 20 {
			t.Fatalf("Model(%s) = %+v, %v; want its 20 workers", m, mv, ok)
		}
		if c, w := byModel.CanaryPeers(m, chat), byScan.CanaryPeers(m, chat); !slices.Equal(c, w) {
			t.Fatalf("CanaryPeers(%s) = %v, want %v", m, c, w)
		}
	}
	if n := st.whole.Load(); n > 1 {
		t.Errorf("the whole table was read %d times in 100 decisions, want at most once (the prune)", n)
	}
}

// prune forgets the state of peers that left the table (nothing in
// flight), from a whole-table read, and not more often than pruneEvery.
// It waits until the state is over twice the table, as before.
func TestPruneForgetsPeersGone(t *testing.T) {
	st := newSwarmTable(100, 4)
	r := New(testHost(t), "/test", st)
	const chat = pb.QueryType_QUERY_TYPE_CHAT
	peers := func() int {
		r.mu.Lock()
		defer r.mu.Unlock()
		return len(r.peers)
	}
	for m := range 4 {
		r.rank(fmt.Sprintf("model-%d", m), chat)
	}
	if n := peers(); n != 100 {
		t.Fatalf("state for %d peers, want 100", n)
	}
	// Only model-0's 25 workers stay in the table.
	st.all = st.byModel["model-0"]
	st.byModel = map[string][]Candidate{"model-0": st.all}
	r.rank("model-0", chat)
	soon := peers()
	r.mu.Lock()
	r.prunedAt = time.Now().Add(-pruneEvery)
	r.mu.Unlock()
	r.rank("model-0", chat)
	if after := peers(); soon != 100 || after != 25 {
		t.Errorf("state for %d peers within pruneEvery, %d after; want 100, then 25", soon, after)
	}
	for _, c := range st.all {
		if r.peers[c.Peer] == nil {
			t.Fatalf("peer %s, still in the table, lost its state", c.Peer)
		}
	}
}

// BenchmarkRankSwarmView: one routing decision of a node holding the
// swarm view, by table size (workers spread over 50 models), reading the
// whole table (the baseline) or the query's model's workers only.
//
//	go test ./node/router -run '^$' -bench RankSwarmView -benchmem
func BenchmarkRankSwarmView(b *testing.B) {
	h := testHost(b)
	for _, n := range []int{100, 1000, 10000} {
		st := newSwarmTable(n, 50)
		for _, tc := range []struct {
			name  string
			table Table
		}{{"whole", wholeOnly{st}}, {"model", st}} {
			b.Run(fmt.Sprintf("workers=%d/%s", n, tc.name), func(b *testing.B) {
				r := New(h, "/test", tc.table)
				i := 0
				for b.Loop() {
					r.rank(fmt.Sprintf("model-%d", i%50), pb.QueryType_QUERY_TYPE_CHAT)
					i++
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "decisions/s")
			})
		}
	}
}

// wholeOnly hides ModelCandidates: a table that can only list everything,
// with the copy a real table's Snapshot makes.
type wholeOnly struct{ t *swarmTable }

func (w wholeOnly) Candidates() []Candidate { return sortedCopy(w.t.all) }
