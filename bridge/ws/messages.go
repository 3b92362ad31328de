package ws

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// inbound is every message a client may send, flattened: the seed client's
// messages carry their fields at the top level, except submit_query which
// nests them under "query". Unknown fields are ignored, as the seed did.
type inbound struct {
	Type string `json:"type"`

	// submit_query
	Query *queryIn `json:"query"`
	// submit_query (optional, ours) and cancel
	QueryID string `json:"query_id"`

	// set_nickname
	Nickname string `json:"nickname"`

	// speech_to_text (audio), text_to_speech (text)
	Audio string `json:"audio"`
	Text  string `json:"text"`

	// vision_chunk
	ChunkID     *int   `json:"chunk_id"`
	TotalChunks *int   `json:"total_chunks"`
	ChunkData   string `json:"chunk_data"`
	ImageID     flexID `json:"image_id"`
	Prompt      string `json:"prompt"`
	QueryType   string `json:"query_type"`
	ModelType   string `json:"model_type"`
	ModelName   string `json:"model_name"`
	History     []turn `json:"history"`

	// vision_chunk, speech_to_text, text_to_speech (optional, ours): as
	// submit_query's query.prefer.
	Prefer string `json:"prefer"`
}

// queryIn is submit_query's "query" object.
type queryIn struct {
	Prompt    string `json:"prompt"`
	QueryType string `json:"query_type"`
	ModelType string `json:"model_type"`
	ModelName string `json:"model_name"`
	Audio     string `json:"audio"` // speech: base64 webm
	Image     string `json:"image"` // vision without chunking (the seed's camera mode)
	History   []turn `json:"history"`
	// Prefer (ours, optional): "energy" or "latency" picks the worker as
	// X-Mtor-Prefer does on the HTTP API; absent, the node's setting.
	Prefer string `json:"prefer"`
}

// turn is one earlier message of a conversation (ours, optional).
type turn struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// flexID accepts a JSON string or number: the seed client sends image_id as
// a string, other clients may not.
type flexID string

func (f *flexID) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*f = flexID(s)
		return nil
	}
	if bytes.Equal(b, []byte("null")) {
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("image_id must be a string or a number")
	}
	if _, err := strconv.ParseFloat(string(n), 64); err != nil {
		return fmt.Errorf("image_id must be a string or a number")
	}
	*f = flexID(n)
	return nil
}

// Outbound messages. The seed's messages keep its exact field names; the
// others are ours and the seed client ignores them.

type userInfoMsg struct {
	Type string   `json:"type"` // user_info
	Data userInfo `json:"data"`
}

type userInfo struct {
	GUID           string  `json:"guid"`
	Nickname       string  `json:"nickname"`
	IsSysop        bool    `json:"is_sysop"`
	IsBanned       bool    `json:"is_banned"`
	QueryCount     int     `json:"query_count"`
	TotalQueryTime float64 `json:"total_query_time"`
	TotalCost      float64 `json:"total_cost"`
}

type setCookieMsg struct {
	Type  string `json:"type"` // set_cookie
	Name  string `json:"name"`
	Value string `json:"value"`
}

type workerUpdateMsg struct {
	Type    string        `json:"type"` // worker_update
	Workers []workerEntry `json:"workers"`
}

// workerEntry is one (model, query type) the swarm serves, in the seed's
// worker shape. Address is always "swarm": workers' network addresses never
// leave the node.
type workerEntry struct {
	Name          string  `json:"name"`
	Address       string  `json:"address"`
	Type          string  `json:"type"`
	HealthScore   float64 `json:"health_score"`
	IsBlacklisted bool    `json:"is_blacklisted"`
	LastActive    string  `json:"last_active"`
	Model         string  `json:"model"` // ours: the model name to route to
	Peers         int     `json:"peers"` // ours: workers serving it
}

type queryResultMsg struct {
	Type           string  `json:"type"` // query_result
	Result         string  `json:"result"`
	ResultType     string  `json:"result_type"` // text, image, audio
	ProcessingTime float64 `json:"processing_time"`
	Cost           float64 `json:"cost"`
	QueryID        string  `json:"query_id"`       // ours
	Mime           string  `json:"mime,omitempty"` // ours, for image and audio
}

type queueUpdateMsg struct {
	Type    string `json:"type"` // queue_update
	Depth   int    `json:"depth"`
	Total   int    `json:"total"`
	QueryID string `json:"query_id,omitempty"` // ours
	// Queue (ours) says which queue depth is about: "bridge" (the bridge's
	// shared queue for a slot in the swarm; depth 1 is next), "worker" (the
	// worker's queue; 0 is running) or "connection" (this connection's own
	// limit). Absent on the summary after a query ends.
	Queue string `json:"queue,omitempty"`
	// Waiting (ours, "bridge" only): queries waiting at the bridge in all.
	Waiting int `json:"waiting,omitempty"`
}

type errorMsg struct {
	Type    string `json:"type"` // error
	Message string `json:"message"`
	Code    string `json:"code,omitempty"`     // ours: BAD_REQUEST, BUSY, ...
	QueryID string `json:"query_id,omitempty"` // ours: the query that failed
	// RetryAfter and RetryAfterMs (ours, BUSY only) say when a retry has a
	// fair chance: seconds rounded up, and milliseconds.
	RetryAfter   int   `json:"retry_after,omitempty"`
	RetryAfterMs int64 `json:"retry_after_ms,omitempty"`
}

// busyMsg is the error that refuses a query for overload, with its retry
// hint.
func busyMsg(msg, queryID string, retry time.Duration) errorMsg {
	retry = max(retry, time.Second)
	return errorMsg{Type: "error", Message: msg, Code: "BUSY", QueryID: queryID,
		RetryAfter: int((retry + time.Second - 1) / time.Second), RetryAfterMs: retry.Milliseconds()}
}

type messageMsg struct {
	Type    string `json:"type"` // vision_upload_complete, vision_chunk_received
	Message string `json:"message"`
	ImageID string `json:"image_id,omitempty"`
}

type textMsg struct {
	Type    string `json:"type"` // transcription_result
	Text    string `json:"text"`
	QueryID string `json:"query_id,omitempty"`
}

type speechResultMsg struct {
	Type    string `json:"type"` // speech_result
	Audio   string `json:"audio"`
	Mime    string `json:"mime,omitempty"`
	QueryID string `json:"query_id,omitempty"`
}

type previousQueriesMsg struct {
	Type string         `json:"type"` // previous_queries
	Data []historyEntry `json:"data"`
}

// historyEntry is one answered query in the seed's shape. The seed client
// puts query_type, model_type and model_name into innerHTML unescaped, so
// they are sent HTML-escaped (which that client then shows correctly).
type historyEntry struct {
	Prompt         string  `json:"prompt"`
	QueryType      string  `json:"query_type"`
	ModelType      string  `json:"model_type"`
	ModelName      string  `json:"model_name"`
	ProcessingTime float64 `json:"processing_time"`
	Cost           float64 `json:"cost"`
	Timestamp      string  `json:"timestamp"`
}

type typeOnly struct {
	Type string `json:"type"` // pong
}

// queryChunkMsg is a token delta of a running query (ours).
// queryRestartMsg: the worker died mid-answer; the chunks sent so far are
// void and the answer streams again from another worker.
type queryRestartMsg struct {
	Type    string `json:"type"` // query_restart
	QueryID string `json:"query_id"`
}

type queryChunkMsg struct {
	Type    string `json:"type"` // query_chunk
	QueryID string `json:"query_id"`
	Text    string `json:"text"`
}

type queryStartedMsg struct {
	Type      string `json:"type"` // query_started
	QueryID   string `json:"query_id"`
	QueryType string `json:"query_type"`
	Model     string `json:"model"`
}

type queryTranscriptMsg struct {
	Type    string `json:"type"` // query_transcript
	QueryID string `json:"query_id"`
	Text    string `json:"text"`
}

// stepInfo describes one swarm query: who answered and how fast.
type stepInfo struct {
	QueryType        string   `json:"query_type"`
	Model            string   `json:"model"`
	Peer             string   `json:"peer"`
	Local            bool     `json:"local"`
	Attempts         int      `json:"attempts"`
	Continued        int      `json:"continued,omitempty"`
	Writers          []string `json:"writers,omitempty"` // a continued answer's workers, in order
	TTFTMs           uint32   `json:"ttft_ms"`
	TotalMs          uint32   `json:"total_ms"`
	QueueMs          uint32   `json:"queue_ms"`
	PromptTokens     uint32   `json:"prompt_tokens"`
	CompletionTokens uint32   `json:"completion_tokens"`
	TokensPerSec     float64  `json:"tokens_per_sec,omitempty"`
	EnergyMJ         uint64   `json:"energy_mj,omitempty"`
	WorkerVersion    string   `json:"worker_version,omitempty"`
	// Receipt is the answer's countersigned receipt, its protobuf in
	// base64 (docs/protocol.md §6.4), when the worker sent one and the
	// routing node accepted it.
	Receipt []byte `json:"receipt,omitempty"`
}

type queryDoneMsg struct {
	Type           string  `json:"type"` // query_done
	QueryID        string  `json:"query_id"`
	ProcessingTime float64 `json:"processing_time"`
	stepInfo
	Steps []stepInfo `json:"steps"`
}
