// Package api is the node's local control API: JSON over HTTP, by default
// on 127.0.0.1:5050, used by the mtor CLI (peers, id, query with
// streaming). It is not the public gateway; that is package bridge.
//
// Endpoints:
//
//	GET  /v1/id      -> IDInfo
//	GET  /v1/peers   -> []router.PeerView
//	GET  /v1/models  -> []router.ModelView
//	POST /v1/query   QueryRequest -> NDJSON stream of Event, ending with
//	                 exactly one "done" or "error" event
//
// Errors before a stream starts are an HTTP status with an ErrorBody.
package api

import (
	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// IDInfo is the answer of GET /v1/id. The fields after Join tell the
// node's state; they are empty when the server has no state source.
type IDInfo struct {
	Peer    string   `json:"peer"`
	Swarm   string   `json:"swarm"`
	Version string   `json:"version"`
	Addrs   []string `json:"addrs"`
	Join    string   `json:"join"`
	// Roles are what the node does: worker, bridge, relay.
	Roles []string `json:"roles"`
	// Reachability: public, behind NAT, behind NAT, relayed via …,
	// loopback only, unknown (checking).
	Reachability string `json:"reachability,omitempty"`
	// ReachabilityStatus is the same as a word: "public", "private"
	// (reached through Relays) or "unknown"; ReachabilityHow says how the
	// node knows (forced, autonat, no public address, announced).
	ReachabilityStatus string `json:"reachability_status,omitempty"`
	ReachabilityHow    string `json:"reachability_how,omitempty"`
	// Relays are the relay reservations the node holds.
	Relays []RelayView `json:"relays,omitempty"`
	// ConnectedPeers counts the peers with a libp2p connection;
	// Connections the connections, more where a peer is reached twice;
	// RedundantClosed the connections the node closed because their peer
	// was reached over another (node/dupconn); SwarmPeers the other peers
	// whose announcements the node holds.
	ConnectedPeers  int   `json:"connected_peers"`
	Connections     int   `json:"connections"`
	RedundantClosed int64 `json:"redundant_closed"`
	SwarmPeers      int   `json:"swarm_peers"`
	// Paths counts the connected peers by path: direct (hole_punched of
	// them after a hole punch) or only relayed.
	Paths PathsView `json:"paths"`
	// Joining: join peers were given and none answers yet; JoinError says
	// why the last attempt failed.
	Joining   bool                `json:"joining,omitempty"`
	JoinError string              `json:"join_error,omitempty"`
	Backends  []node.BackendState `json:"backends"`
	// Gossip is the gossipsub traffic since the node started (announcements
	// and gossip control, by protobuf size): what announcing costs it.
	Gossip *discovery.Traffic `json:"gossip,omitempty"`
}

// Peer is one row of GET /v1/peers: a worker as the router sees it, plus
// this node's backends on its own row, which is listed even when it serves
// nothing, and relays that serve no model.
type Peer struct {
	router.PeerView
	Relay    bool                `json:"relay,omitempty"`
	Backends []node.BackendState `json:"backends,omitempty"`
}

// PathsView counts connected peers by path.
type PathsView struct {
	Direct      int `json:"direct"`
	HolePunched int `json:"hole_punched"`
	Relayed     int `json:"relayed"`
}

// RelayView is a relay reservation the node holds.
type RelayView struct {
	Peer      string   `json:"peer"`
	Addrs     []string `json:"addrs"`
	ExpiresMs int64    `json:"expires_unix_ms"`
}

// Attachment is a media attachment; Data is base64 in JSON.
type Attachment struct {
	MIME string `json:"mime"`
	Data []byte `json:"data"`
}

// Message is one chat message.
type Message struct {
	Role        string       `json:"role"`
	Content     string       `json:"content"`
	Attachments []Attachment `json:"attachments,omitempty"`
}

// Params are the generation parameters of a query.
type Params struct {
	MaxTokens   uint32   `json:"max_tokens,omitempty"`
	Temperature *float32 `json:"temperature,omitempty"`
	TopP        *float32 `json:"top_p,omitempty"`
	Stop        []string `json:"stop,omitempty"`
	Seed        *int64   `json:"seed,omitempty"`
	Size        string   `json:"size,omitempty"`
	Voice       string   `json:"voice,omitempty"`
	Format      string   `json:"format,omitempty"`
}

// QueryRequest is the body of POST /v1/query.
type QueryRequest struct {
	Model       string       `json:"model"`
	Type        string       `json:"type,omitempty"` // chat (default), vision, imagine, stt, tts, embed
	Prompt      string       `json:"prompt,omitempty"`
	Messages    []Message    `json:"messages,omitempty"`
	Attachments []Attachment `json:"attachments,omitempty"`
	Inputs      []string     `json:"inputs,omitempty"`
	Params      *Params      `json:"params,omitempty"`
	Priority    int32        `json:"priority,omitempty"`
	TimeoutMs   int64        `json:"timeout_ms,omitempty"` // 0 = the server's default
	// Prefer is how the node's router picks the worker: "energy" (lowest
	// measured joules per token within its latency slack), "latency", or
	// "" for the node's own --prefer-energy.
	Prefer string `json:"prefer,omitempty"`
}

// Event names, the value of Event.Event.
const (
	EventAccepted  = "accepted"
	EventChunk     = "chunk"
	EventMedia     = "media"
	EventEmbedding = "embedding"
	EventDone      = "done"
	EventError     = "error"
	// EventRestart: the worker answering died after sending output; discard
	// everything received so far, the query runs again on another worker.
	EventRestart = "restart"
)

// Event is one line of the NDJSON stream of POST /v1/query. Exactly one of
// the embedded parts is set, matching Event; their JSON fields are inlined.
type Event struct {
	Event string `json:"event"`
	*AcceptedEvent
	*ChunkEvent
	*MediaEvent
	*EmbeddingEvent
	*DoneEvent
	*ErrorEvent
}

// AcceptedEvent: a worker admitted the query.
type AcceptedEvent struct {
	QueuePosition uint32 `json:"queue_position"`
}

// ChunkEvent is a text delta.
type ChunkEvent struct {
	Text string `json:"text"`
}

// MediaEvent is media output (an image, audio); Data is base64 in JSON.
type MediaEvent struct {
	MIME string `json:"mime"`
	Data []byte `json:"data"`
}

// EmbeddingEvent is one embedding vector.
type EmbeddingEvent struct {
	Index  uint32    `json:"index"`
	Vector []float32 `json:"vector"`
}

// Usage is token accounting.
type Usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
}

// DoneEvent ends a successful query. TTFTMs and TotalMs are measured by
// the node that routed the query (they include the network); QueueMs and
// WorkerTotalMs come from the worker.
type DoneEvent struct {
	Peer          string `json:"peer"`
	Local         bool   `json:"local"`
	Attempts      int    `json:"attempts"`
	Continued     int    `json:"continued,omitempty"` // times another worker took the answer over
	Model         string `json:"model"`
	Usage         Usage  `json:"usage"`
	TTFTMs        uint32 `json:"ttft_ms"`
	TotalMs       uint32 `json:"total_ms"`
	QueueMs       uint32 `json:"queue_ms"`
	WorkerTTFTMs  uint32 `json:"worker_ttft_ms"`
	WorkerTotalMs uint32 `json:"worker_total_ms"`
	EnergyMJ      uint64 `json:"energy_mj"`
	WorkerVersion string `json:"worker_version"`
	// Receipt is the countersigned receipt (docs/protocol.md §6.4), its
	// protobuf encoding in base64; absent when the worker sent none or it
	// was refused.
	Receipt []byte `json:"receipt,omitempty"`
}

// ErrorEvent ends a failed query. Code is the protocol's short code name
// (BAD_REQUEST, UNSUPPORTED, BUSY, ...).
type ErrorEvent struct {
	Code      string `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
}

// Codes of the API's own refusals, which concern the HTTP request rather
// than a query, so the protocol's codes do not fit them.
const (
	CodeForbidden = "FORBIDDEN" // 403: not a client the API serves
	CodeNotFound  = "NOT_FOUND" // 404: no such endpoint
)

// ErrorBody is the JSON body of every non-2xx answer.
type ErrorBody struct {
	Error ErrorEvent `json:"error"`
}

func errorEvent(e *protocol.Error) *ErrorEvent {
	return &ErrorEvent{Code: protocol.CodeName(e.Code), Message: e.Message, Retryable: e.Retryable}
}

// ProtoError converts an error event back into a typed protocol error; an
// unknown code becomes INTERNAL.
func (e *ErrorEvent) ProtoError() *protocol.Error {
	code, ok := pb.ErrorCode_value["ERROR_CODE_"+e.Code]
	if !ok || code == 0 {
		return &protocol.Error{Code: protocol.CodeInternal, Message: e.Code + ": " + e.Message, Retryable: e.Retryable}
	}
	return &protocol.Error{Code: pb.ErrorCode(code), Message: e.Message, Retryable: e.Retryable}
}
