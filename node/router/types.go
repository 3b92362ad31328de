package router

import (
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Handler receives a query's events as they arrive: Accepted, Chunk, Media
// and Embedding. Done and Error end the query and come back from Query
// instead. A non-nil return cancels the query.
type Handler func(*pb.Event) error

// Result is how a query ended when it succeeded.
type Result struct {
	Peer      peer.ID // the worker that answered
	Local     bool    // answered by this node's own worker, no network hop
	Attempts  int     // workers tried, including the one that answered
	Continued int     // times the answer was taken over by another worker mid-way
	// Writers are the workers whose output makes up the answer, in
	// order: more than one when it was continued.
	Writers []peer.ID
	Done    *pb.Done // the worker's Done event
	TTFTMs  uint32   // time to first output as seen by the router
	TotalMs uint32   // total time as seen by the router
	name    string   // Peer's text form, kept by the router per peer
}

// PeerString is Peer's text form (base58). The router encodes it once
// per peer, not once per answer: a few percent of a bridge's CPU went on
// encoding the same worker's ID for every answer's header.
func (r *Result) PeerString() string {
	if r.name != "" {
		return r.name
	}
	return r.Peer.String()
}

// ContinuedBy names the workers of a continued answer, in order; nil when
// one worker wrote it all.
func (r *Result) ContinuedBy() []string {
	if r.Continued == 0 {
		return nil
	}
	out := make([]string, len(r.Writers))
	for i, p := range r.Writers {
		out[i] = p.String()
	}
	return out
}

// ModelView is one model the swarm serves.
type ModelView struct {
	Name  string   `json:"name"`
	Types []string `json:"types"`
	Peers int      `json:"peers"`
	// Features are those announced for the model by at least one peer,
	// sorted (protocol.FeatureTools, ...).
	Features []string `json:"features,omitempty"`
	// Catalog: known only from the swarm's model catalogue (a node
	// without the swarm view that has not routed to it); Peers is then
	// the catalogue's count of workers, none of which this node holds.
	Catalog bool `json:"catalog,omitempty"`
}

// ModelStat is a model as a peer announces it.
type ModelStat struct {
	Name           string   `json:"name"`
	Types          []string `json:"types"`
	Backend        string   `json:"backend,omitempty"`
	ContextLength  uint32   `json:"context_length,omitempty"`
	TokensPerSec   float32  `json:"tokens_per_sec,omitempty"`
	P50TTFTMs      uint32   `json:"p50_ttft_ms,omitempty"`
	JoulesPerToken float32  `json:"joules_per_token,omitempty"`
	// Breaker is this node's breaker for the peer and this model, when
	// not closed: "open" while the peer is banned from the model (it
	// kept failing it), "half-open" while a trial query is allowed.
	Breaker string `json:"breaker,omitempty"`
}

// GPUView is a GPU as a peer announces it.
type GPUView struct {
	Name        string `json:"name"`
	UUID        string `json:"uuid,omitempty"`
	VRAMTotal   uint64 `json:"vram_total_bytes"`
	VRAMFree    uint64 `json:"vram_free_bytes"`
	UtilPercent uint32 `json:"util_percent"`
	PowerMW     uint32 `json:"power_mw"`
}

// PeerView is one worker of the peer table as people and the bridge see it.
// It never holds network addresses.
type PeerView struct {
	Peer           string      `json:"peer"`
	Self           bool        `json:"self"`
	Version        string      `json:"version"`
	Roles          []string    `json:"roles"`
	Models         []ModelStat `json:"models"`
	GPUs           []GPUView   `json:"gpus"`
	InFlight       uint32      `json:"in_flight"`
	MaxConcurrency uint32      `json:"max_concurrency"`
	Queued         uint32      `json:"queued"`
	LocalInFlight  int         `json:"local_in_flight"` // our queries to it now
	Health         uint32      `json:"health"`          // announced, 0..100
	LocalHealth    float64     `json:"local_health"`    // from our own outcomes, 0..100
	Breaker        string      `json:"breaker"`         // closed, open, half-open
	Draining       bool        `json:"draining"`
	RTTMs          float64     `json:"rtt_ms"`
	RTTRelayed     bool        `json:"rtt_relayed,omitempty"` // rtt_ms was measured through a relay
	AgeMs          int64       `json:"age_ms"`                // since its last announcement
	// Path is how this node is connected to the peer now: "direct",
	// "relayed" (then Relay is the relay's peer ID), or "" when not
	// connected. HolePunched marks a direct connection that a hole punch
	// (DCUtR) made out of a relayed one. Unreachable is set while the
	// peer could not be dialled and has not announced since.
	// Transports are those of the direct connections ("quic-v1", "tcp"),
	// sorted: which one a hole punch chose, and both while a connection
	// of each kind is open.
	Path        string   `json:"path,omitempty"`
	Relay       string   `json:"path_relay,omitempty"`
	Transports  []string `json:"path_transports,omitempty"`
	HolePunched bool     `json:"hole_punched,omitempty"`
	Unreachable bool     `json:"unreachable,omitempty"`
	// Connections counts this node's connections to the peer: more than
	// one while it is reached twice (two that crossed, before
	// node/dupconn closes one, or a relayed one kept beside a direct one).
	Connections int `json:"connections,omitempty"`
	// Reachability is how others reach the peer, from the addresses it
	// announces: "public" (a public address), "relayed" (through the
	// relays in RelayedVia: it is behind NAT), "private" (only private
	// or loopback addresses: reachable on its LAN), "" (none announced).
	Reachability string   `json:"reachability,omitempty"`
	RelayedVia   []string `json:"relayed_via,omitempty"`
	// Reputation is how far honesty spot checks trust the peer's answers
	// to come from the model it announces, 0..100 (100 until checked);
	// Distrusted peers, below the threshold, get no traffic.
	Reputation float64 `json:"reputation"`
	Distrusted bool    `json:"distrusted,omitempty"`
}
