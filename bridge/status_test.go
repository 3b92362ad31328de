package bridge

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/node/router"
)

// peerTableSwarm is a fake Swarm whose peer table is given: the other
// nodes of a swarm (clients, bootstraps, relays) are listed beside the
// workers, as a router lists every peer that announces.
type peerTableSwarm struct {
	fakeSwarm
	peers []router.PeerView
}

func (s *peerTableSwarm) Peers() []router.PeerView { return s.peers }

// TestHealthzCountsWorkers: /healthz "peers" and mtor_swarm_peers count the
// peers that serve a model, not every node in the peer table.
func TestHealthzCountsWorkers(t *testing.T) {
	model := []router.ModelStat{{Name: "demo", Types: []string{"chat"}}}
	tests := []struct {
		name  string
		peers []router.PeerView
		want  int
	}{
		{"empty", nil, 0},
		{"only non-workers", []router.PeerView{
			{Peer: "self", Self: true, Roles: []string{"bridge"}},
			{Peer: "relay", Roles: []string{"relay"}, Models: []router.ModelStat{}},
		}, 0},
		{"mixed", []router.PeerView{
			{Peer: "self", Self: true, Roles: []string{"bridge"}},
			{Peer: "w1", Roles: []string{"worker"}, Models: model},
			{Peer: "bootstrap", Roles: []string{"bootstrap", "relay"}},
			{Peer: "w2", Roles: []string{"worker"}, Models: model, Draining: true},
			{Peer: "client"},
		}, 2},
		{"self is a worker", []router.PeerView{
			{Peer: "self", Self: true, Roles: []string{"worker", "bridge"}, Models: model},
		}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, base := startBridge(t, &peerTableSwarm{peers: tt.peers})
			resp, b := call(t, "GET", base+"/healthz", "", nil, nil)
			var h struct {
				Status string `json:"status"`
				Peers  *int   `json:"peers"`
			}
			if err := json.Unmarshal(b, &h); err != nil || resp.StatusCode != 200 || h.Status != "ok" || h.Peers == nil {
				t.Fatalf("healthz %d %s (%v)", resp.StatusCode, b, err)
			}
			if *h.Peers != tt.want {
				t.Errorf("healthz peers = %d, want %d (of %d in the table)", *h.Peers, tt.want, len(tt.peers))
			}
			_, m := call(t, "GET", base+"/metrics", "", nil, nil)
			if want := fmt.Sprintf("\nmtor_swarm_peers %d\n", tt.want); !strings.Contains(string(m), want) {
				t.Errorf("metrics lack %q", strings.TrimSpace(want))
			}
		})
	}
}
