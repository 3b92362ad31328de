package router

import (
	"sync"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// measureLog records what a router tells its Measurer.
type measureLog struct {
	mu    sync.Mutex
	peers []peer.ID
	ttfts []float64
}

func (m *measureLog) Measured(p peer.ID, ttftMs float64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.peers = append(m.peers, p)
	m.ttfts = append(m.ttfts, ttftMs)
}

// After each answer from a worker the router tells its Measurer the
// worker's smoothed TTFT, the figure its own score uses (which a bounded
// peer table then judges the worker on); a worker that failed the query
// is not reported.
func TestMeasurerToldAfterEachAnswer(t *testing.T) {
	h := testHost(t)
	live := demoWorker(t, "live", 0)
	dead := acceptThenDie(t)
	connect(t, h, live, dead)
	tests := []struct {
		name  string
		table staticTable
		want  peer.ID // "" none
	}{
		{"an answer", staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)}, live.ID()},
		{"a worker that died mid-answer", staticTable{cand(string(dead.ID()), 0, 4, 100, 0, demoModel)}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &measureLog{}
			r := New(h, testProto, tc.table, WithMeasurer(m), WithMaxAttempts(1))
			for range 3 {
				_, _ = r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"},
					func(*pb.Event) error { return nil })
			}
			m.mu.Lock()
			defer m.mu.Unlock()
			if tc.want == "" {
				if len(m.peers) != 0 {
					t.Fatalf("measurer told %v, want nothing", m.peers)
				}
				return
			}
			if len(m.peers) != 3 {
				t.Fatalf("measurer told %d times, want 3", len(m.peers))
			}
			r.mu.Lock()
			ttft := r.state(tc.want).ttft
			r.mu.Unlock()
			for i, p := range m.peers {
				if p != tc.want || m.ttfts[i] <= 0 {
					t.Fatalf("measurer told %s %.2f ms, want %s and a positive TTFT", p, m.ttfts[i], tc.want)
				}
			}
			if last := m.ttfts[2]; last != ttft {
				t.Fatalf("last TTFT told %.3f ms, router's own %.3f ms", last, ttft)
			}
		})
	}
}
