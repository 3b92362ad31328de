package router

import (
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// scores is a Reputation given as a table, threshold 40 as canary.Book's
// default.
type scores map[peer.ID]float64

func (s scores) Score(p peer.ID) float64 {
	if v, ok := s[p]; ok {
		return v
	}
	return 100
}
func (s scores) Distrusted(p peer.ID) bool { return s.Score(p) < 40 }

func TestReputationWeighsAndExcludes(t *testing.T) {
	h := testHost(t)
	tests := []struct {
		name  string
		table staticTable
		rep   scores
		want  []string // peer order, best first
	}{
		{"no verdicts: by load", staticTable{cand("a", 1, 4, 100, 0), cand("b", 0, 4, 100, 0)}, scores{}, []string{"b", "a"}},
		{"doubted ranks after an equal peer", staticTable{cand("doubted", 0, 4, 100, 0), cand("trusted", 0, 4, 100, 0)},
			scores{"doubted": 45}, []string{"trusted", "doubted"}},
		{"distrusted is left out", staticTable{cand("liar", 0, 4, 100, 0), cand("honest", 3, 4, 100, 0)},
			scores{"liar": 25}, []string{"honest"}},
		{"this node is never distrusted", staticTable{cand(string(h.ID()), 0, 4, 100, 0)},
			scores{h.ID(): 0}, []string{string(h.ID())}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := New(h, "/test", tc.table, WithReputation(tc.rep))
			ranked, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
			var got []string
			for _, c := range ranked {
				got = append(got, string(c.Peer))
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("order = %v, want %v", got, tc.want)
			}
			peers := r.CanaryPeers("m", pb.QueryType_QUERY_TYPE_CHAT)
			if len(peers) != len(tc.table) && tc.table[0].Peer != h.ID() {
				t.Fatalf("canary peers %v, want every capable peer, distrusted ones included", peers)
			}
		})
	}
}
