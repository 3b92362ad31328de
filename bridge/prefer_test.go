package bridge

import (
	"context"
	"sync"
	"testing"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// preferSwarm is the real in-process worker, recording the routing
// preference each query's context carries to the swarm.
type preferSwarm struct {
	*localSwarm
	mu   sync.Mutex
	seen []router.EnergyPreference
}

func (s *preferSwarm) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	s.mu.Lock()
	s.seen = append(s.seen, router.EnergyPreferenceOf(ctx))
	s.mu.Unlock()
	return s.localSwarm.Query(ctx, req, h)
}

func TestPreferHeader(t *testing.T) {
	sw := &preferSwarm{localSwarm: newLocalSwarm(t)}
	_, base := startBridge(t, sw)
	tests := []struct {
		header string
		status int
		want   router.EnergyPreference
	}{
		{"", 200, router.EnergyDefault},
		{"energy", 200, router.EnergyPrefer},
		{" Energy ", 200, router.EnergyPrefer},
		{"latency", 200, router.EnergyIgnore},
		{"cheapest", 400, 0},
	}
	for _, tc := range tests {
		t.Run(tc.header, func(t *testing.T) {
			sw.mu.Lock()
			sw.seen = nil
			sw.mu.Unlock()
			hdr := map[string]string{}
			if tc.header != "" {
				hdr[preferHeader] = tc.header
			}
			resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`, hdr)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			sw.mu.Lock()
			defer sw.mu.Unlock()
			if tc.status != 200 {
				if len(sw.seen) != 0 {
					t.Fatalf("a refused request reached the swarm")
				}
				return
			}
			if len(sw.seen) != 1 || sw.seen[0] != tc.want {
				t.Fatalf("swarm saw preferences %v, want [%v]", sw.seen, tc.want)
			}
		})
	}
}
