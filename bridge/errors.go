package bridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/bridge/internal/scrub"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// OpenAI's error types.
const (
	typeInvalidRequest = "invalid_request_error"
	typeRateLimit      = "rate_limit_error"
	typeServer         = "server_error"
)

// statusClientClosed is nginx's code for a client that went away; nobody
// reads it, but metrics and logs tell it apart from a server failure.
const statusClientClosed = 499

// apiError is an error as an OpenAI client reads it:
// {"error":{"message","type","param","code"}} with an HTTP status.
type apiError struct {
	Status     int
	Message    string
	Type       string
	Param      string
	Code       string
	RetryAfter time.Duration // sets Retry-After when > 0
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message) }

// errorBody is the JSON form; param and code are null when empty, as OpenAI
// sends them.
type errorBody struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func (e *apiError) body() errorBody {
	var b errorBody
	b.Error.Message = e.Message
	b.Error.Type = e.Type
	if e.Param != "" {
		p := e.Param
		b.Error.Param = &p
	}
	if e.Code != "" {
		c := e.Code
		b.Error.Code = &c
	}
	return b
}

func badRequest(param, code, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Param: param, Code: code, Message: fmt.Sprintf(format, args...)}
}

func tooLarge(param, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Param: param, Code: "request_too_large", Message: fmt.Sprintf(format, args...)}
}

// responseTooLarge is a non-streamed answer that outgrew what the bridge
// gathers (WithMaxAnswer): the answer was too large, not the request, and
// the fault is upstream, hence a 502.
func responseTooLarge(max int, hint string) *apiError {
	return &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "response_too_large",
		Message: fmt.Sprintf("The worker's answer exceeded %d bytes, the most this bridge gathers for a non-streamed answer%s.", max, hint)}
}

// errBridgeStopping is the cause the bridge's stop cancels its requests
// with, once the grace ran out.
var errBridgeStopping = errors.New("the bridge is stopping")

// bridgeStopped is a query cut when the bridge stopped: another bridge
// (or this one, restarted) may answer it.
func bridgeStopped(retryAfter time.Duration) *apiError {
	return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: "bridge_stopping", RetryAfter: retryAfter,
		Message: "The bridge stopped before the answer; ask again on another."}
}

func modelNotFound(model string) *apiError {
	return &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Param: "model", Code: "model_not_found",
		Message: fmt.Sprintf("The model %q is not served by any peer of this swarm (GET /v1/models lists what is).", model)}
}

// fromProtocol maps a swarm error to its HTTP form (BRIDGE.md's table).
// Messages are scrubbed of anything that looks like a network address,
// since worker errors may quote one.
func fromProtocol(err error, retryAfter time.Duration) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	pe := protocol.AsError(err)
	msg := scrub.Addresses(pe.Message)
	var be *queue.BusyError
	if errors.As(err, &be) && be.RetryAfter > 0 {
		retryAfter = be.RetryAfter // the queue's estimate
	}
	switch pe.Code {
	case pb.ErrorCode_ERROR_CODE_BAD_REQUEST:
		return &apiError{Status: http.StatusBadRequest, Type: typeInvalidRequest, Code: "bad_request", Message: msg}
	case pb.ErrorCode_ERROR_CODE_TOO_LARGE:
		return &apiError{Status: http.StatusRequestEntityTooLarge, Type: typeInvalidRequest, Code: "request_too_large", Message: msg}
	case pb.ErrorCode_ERROR_CODE_BUSY:
		return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: "swarm_busy", RetryAfter: retryAfter,
			Message: "Every peer that serves this model is busy; retry later. (" + msg + ")"}
	case pb.ErrorCode_ERROR_CODE_UNSUPPORTED:
		return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: "no_capable_peer",
			Message: "No peer of the swarm can answer this query now. (" + msg + ")"}
	case pb.ErrorCode_ERROR_CODE_TIMEOUT:
		return &apiError{Status: http.StatusGatewayTimeout, Type: typeServer, Code: "timeout", Message: msg}
	case pb.ErrorCode_ERROR_CODE_CANCELLED:
		return &apiError{Status: statusClientClosed, Type: typeInvalidRequest, Code: "cancelled", Message: msg}
	case pb.ErrorCode_ERROR_CODE_BACKEND_ERROR:
		return &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "backend_error", Message: msg}
	case pb.ErrorCode_ERROR_CODE_UNAVAILABLE:
		// The workers tried died or could not be reached, or none of a
		// model the swarm lists could be found yet: no backend failed,
		// and a retry soon may find live ones.
		return &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: "workers_unavailable", RetryAfter: retryAfter,
			Message: "No worker could finish this query now; retry shortly. (" + msg + ")"}
	}
	return &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: "internal_error", Message: msg}
}

// errorWriter writes an error in one API's shape: writeError (OpenAI's,
// and mtor's own) or ollamaError.
type errorWriter func(http.ResponseWriter, *apiError)

// writeErrorFor writes e in the shape of the API r asked for: the Ollama
// API's {"error": "..."} under /api/ (but /api/swarm, mtor's own),
// OpenAI's elsewhere. For the host check, which guards every path before
// any API's own wrappers (Server.api) are reached.
func writeErrorFor(w http.ResponseWriter, r *http.Request, e *apiError) {
	if strings.HasPrefix(r.URL.Path, "/api/") && r.URL.Path != "/api/swarm" {
		ollamaError(w, e)
		return
	}
	writeError(w, e)
}

// writeError sends e in OpenAI's shape.
func writeError(w http.ResponseWriter, e *apiError) {
	h := w.Header()
	if e.RetryAfter > 0 {
		secs := int((e.RetryAfter + time.Second - 1) / time.Second)
		h.Set("Retry-After", strconv.Itoa(secs))
		h.Set("Retry-After-Ms", strconv.FormatInt(e.RetryAfter.Milliseconds(), 10))
	}
	if e.Status == http.StatusUnauthorized {
		h.Set("WWW-Authenticate", `Bearer realm="mtor"`)
	}
	h.Del("Content-Length")
	h.Del("X-Mtor-Peer")
	writeJSON(w, e.Status, e.body())
}

// writeJSON sends v with status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b = []byte(`{"error":{"message":"encoding the response failed","type":"server_error","param":null,"code":"internal_error"}}`)
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	writeBody(w, b)
}

// writeBody writes b under a write deadline, so that a client that does
// not read cannot hold the handler (the next request on the connection
// starts without it: writeDeadlines).
func writeBody(w http.ResponseWriter, b []byte) {
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Now().Add(defaultWriteTimeout))
	_, _ = w.Write(b)
	_ = rc.Flush()
}

// invalidRequest is the 400 of a request of type t that the protocol's
// rules refuse before it is routed, naming the parameter it is about, as
// OpenAI's errors do (param), where the rule is about one.
func invalidRequest(pe *protocol.Error, t pb.QueryType) *apiError {
	return badRequest(requestParam(pe.Field, t), "invalid_value", "%s.", pe.Message)
}

// requestParam is the OpenAI request parameter of a protocol request
// field (protocol.Error.Field) in a request of type t, or "" for a field
// no OpenAI request has.
func requestParam(field string, t pb.QueryType) string {
	switch field {
	case "inputs":
		return "input"
	case "prompt":
		if t == pb.QueryType_QUERY_TYPE_TTS {
			return "input" // /v1/audio/speech
		}
	case "format":
		if t == pb.QueryType_QUERY_TYPE_IMAGINE {
			return "output_format" // /v1/images/generations
		}
		return "response_format" // /v1/audio/speech
	case "id", "type", "deadline_unix_ms", "continuation", "priority", "attachments":
		// The bridge sets these itself, or (attachments) from where
		// the request's media came; no parameter names them.
		return ""
	}
	return field
}
