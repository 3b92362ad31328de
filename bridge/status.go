package bridge

import (
	"net/http"

	"github.com/mtor-swarm/mtor/node/router"
)

// swarmView is GET /api/swarm: the peer table and models, never addresses.
type swarmView struct {
	Peers  []router.PeerView  `json:"peers"`
	Models []router.ModelView `json:"models"`
	Self   string             `json:"self"`
	// Ledger is this node's account of work with its peers, when the
	// bridge was given it.
	Ledger *ledgerView `json:"ledger,omitempty"`
}

func (s *Server) handleSwarm(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: typeInvalidRequest, Code: "method_not_allowed", Message: "Use GET."})
		return
	}
	v := swarmView{Peers: s.swarm.Peers(), Models: s.swarm.Models(), Self: s.cfg.selfID}
	// The peer table is public to the swarm; what this node consumed and
	// served is not: a bridge with keys shows it only to a key holder.
	if k := bearer(r); !s.keys.enabled() || k != "" && s.keys.valid(k) {
		v.Ledger = s.ledgerView()
	}
	if v.Peers == nil {
		v.Peers = []router.PeerView{}
	}
	if v.Models == nil {
		v.Models = []router.ModelView{}
	}
	if v.Self == "" {
		for _, p := range v.Peers {
			if p.Self {
				v.Self = p.Peer
				break
			}
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, v)
}

// handleHealth is GET /healthz; "peers" counts workers only.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "peers": countWorkers(s.swarm)})
}

// workerCounter counts workers without building the peer views
// (*router.Router does).
type workerCounter interface{ Workers() int }

// countWorkers is the swarm's worker count, cheaply where the swarm can.
func countWorkers(sw Swarm) int {
	if wc, ok := sw.(workerCounter); ok {
		return wc.Workers()
	}
	return workers(sw.Peers())
}

// workers counts the peers that serve at least one model: the peer table
// also holds clients, bootstraps and relays, which answer no query.
func workers(peers []router.PeerView) int {
	n := 0
	for _, p := range peers {
		if len(p.Models) > 0 {
			n++
		}
	}
	return n
}
