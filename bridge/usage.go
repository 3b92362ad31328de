package bridge

import (
	"net/http"
	"sync"
	"time"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/router"
)

// maxUsageClients bounds the clients whose usage the bridge keeps; the
// least recently active goes first.
const maxUsageClients = 4096

// Ledger is this node's account of work per peer (*ledger.Ledger).
type Ledger interface {
	Snapshot() ledger.Snapshot
}

// clientUsage is what one client of the bridge ran through the swarm:
// the per-user query count, time and cost. Receipts counts the answers
// that came with a receipt the routing node checked (countersigned in
// the batch that returns it to its worker: router.CountersignLater).
type clientUsage struct {
	Client           string `json:"client"`
	Queries          uint64 `json:"queries"`
	PromptTokens     uint64 `json:"prompt_tokens"`
	CompletionTokens uint64 `json:"completion_tokens"`
	Ms               uint64 `json:"ms"`
	EnergyMJ         uint64 `json:"energy_mj"`
	Receipts         uint64 `json:"receipts"`
	LastUnixMs       int64  `json:"last_unix_ms,omitempty"`
}

// usageBook keeps clientUsage per client key (queue.Client.Key: "key:"
// and the API key's hash, "ip:" and the address, "ws:" and the page's id).
type usageBook struct {
	mu  sync.Mutex
	max int
	m   map[string]*clientUsage
}

func newUsageBook(max int) *usageBook { return &usageBook{max: max, m: map[string]*clientUsage{}} }

// record adds one answered query of client.
func (b *usageBook) record(client string, res *router.Result) {
	if client == "" || res == nil {
		return
	}
	d := res.Done
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.m[client]
	if u == nil {
		if len(b.m) >= b.max {
			b.evictLocked()
		}
		u = &clientUsage{Client: client}
		b.m[client] = u
	}
	u.Queries++
	u.PromptTokens += uint64(d.GetUsage().GetPromptTokens())
	u.CompletionTokens += uint64(d.GetUsage().GetCompletionTokens())
	u.Ms += uint64(res.TotalMs)
	u.EnergyMJ = ledger.SatAdd(u.EnergyMJ, d.GetEnergyMj()) // a worker's own figure: it may be absurd
	// Checked; countersigned now or in the batch that returns it.
	if d.GetReceipt() != nil {
		u.Receipts++
	}
	u.LastUnixMs = time.Now().UnixMilli()
}

func (b *usageBook) evictLocked() {
	var oldest *clientUsage
	for _, u := range b.m {
		if oldest == nil || u.LastUnixMs < oldest.LastUnixMs {
			oldest = u
		}
	}
	if oldest != nil {
		delete(b.m, oldest.Client)
	}
}

func (b *usageBook) get(client string) clientUsage {
	b.mu.Lock()
	defer b.mu.Unlock()
	if u := b.m[client]; u != nil {
		return *u
	}
	return clientUsage{Client: client}
}

// handleUsage is GET /v1/usage: the calling client's own usage (its API
// key's, else its address's), never another's.
func (s *Server) handleUsage(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.usage.get(queue.ClientFrom(r.Context()).Key))
}

// ledgerView is the part of this node's ledger the web page shows.
type ledgerView struct {
	Total ledger.Sides   `json:"total"`
	Peers []ledger.Entry `json:"peers"` // most recent first, at most maxLedgerPeers
}

const maxLedgerPeers = 20

func (s *Server) ledgerView() *ledgerView {
	if s.cfg.ledger == nil {
		return nil
	}
	snap := s.cfg.ledger.Snapshot()
	return &ledgerView{Total: snap.Total, Peers: snap.Peers[:min(len(snap.Peers), maxLedgerPeers)]}
}
