package bridge

import (
	"bytes"
	"encoding/json"
	"errors"
	"mime"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
)

// limitBody bounds r's body at max bytes and its reading at timeout, so
// that a slow upload cannot hold a handler forever. Call the returned func
// when the body is read. After a read that went well it lifts the read
// deadline, which must not outlive the body or it would cut the connection
// under a long SSE stream. After one that failed (or stopped early) it
// keeps the deadline and closes the connection after the answer: net/http
// would otherwise read on to discard the rest of the body (up to 256 KiB)
// before answering, with no deadline, from the client that stalled it.
func limitBody(w http.ResponseWriter, r *http.Request, max int64, timeout time.Duration) func(failed bool) {
	r.Body = http.MaxBytesReader(w, r.Body, max)
	rc := http.NewResponseController(w)
	lift := rc.SetReadDeadline(time.Now().Add(timeout)) == nil
	return func(failed bool) {
		if failed {
			w.Header().Set("Connection", "close")
			return
		}
		if lift {
			_ = rc.SetReadDeadline(time.Time{})
		}
	}
}

// bodyError maps a failed body read.
func bodyError(err error, max int64) *apiError {
	var (
		mbe *http.MaxBytesError
		ae  *apiError
	)
	if errors.As(err, &ae) { // the bridge's own refusal, e.g. its byte budget
		return ae
	}
	if errors.As(err, &mbe) {
		return tooLarge("", "Request body is larger than the limit of %d bytes.", max)
	}
	if protocol.IsTimeout(err) {
		return &apiError{Status: http.StatusRequestTimeout, Type: typeInvalidRequest, Code: "request_timeout", Message: "Reading the request body took too long."}
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		// Its text names the connection's addresses.
		return badRequest("", "invalid_body", "Reading the request body failed: the connection broke.")
	}
	return badRequest("", "invalid_body", "Reading the request body failed: %v", err)
}

// decode is decodeJSON within the bridge's bounds on a request body.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) *apiError {
	return decodeJSON(w, r, s.cfg.maxBody, s.cfg.bodyTimeout, v)
}

// decodeOllama is decode for the Ollama API, which reads its body as JSON
// whatever its Content-Type, as Ollama does: its own examples use curl -d,
// which sends application/x-www-form-urlencoded. A browser's cross-origin
// request, which a form could send without a preflight, is refused on its
// Origin before this (corsPolicy).
func (s *Server) decodeOllama(w http.ResponseWriter, r *http.Request, v any) *apiError {
	return readJSON(w, r, s.cfg.maxBody, s.cfg.bodyTimeout, v)
}

// decodeJSON reads r's body (at most max bytes, for at most timeout) into v. Unknown fields are
// ignored, as OpenAI clients send extras; a known field of the wrong type,
// invalid JSON, an empty body or trailing data is a 400 naming the problem.
//
// The body is read whole into one buffer, at most its declared size, and
// decoded from there: a json.Decoder would copy it into a buffer of its
// own, grown by copying, up to three times its size at once.
func decodeJSON(w http.ResponseWriter, r *http.Request, max int64, timeout time.Duration, v any) *apiError {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
			return badRequest("", "invalid_content_type", "Content-Type must be application/json, not %q.", ct)
		}
	}
	return readJSON(w, r, max, timeout, v)
}

// readJSON is decodeJSON without the Content-Type check.
func readJSON(w http.ResponseWriter, r *http.Request, max int64, timeout time.Duration, v any) *apiError {
	done := limitBody(w, r, max, timeout)
	body, aerr := readBody(r, max)
	done(aerr != nil)
	if aerr != nil {
		return aerr
	}
	if err := json.Unmarshal(body, v); err != nil {
		return jsonError(body, err)
	}
	return nil
}

// readBody reads r's body whole (see readAll), growing the request's
// reservation of the bridge's body budget.
func readBody(r *http.Request, max int64) ([]byte, *apiError) {
	if r.ContentLength > max {
		return nil, declaredTooLarge(r.ContentLength, max)
	}
	b, err := readAll(r.Body, r.ContentLength, reservationOf(r))
	if err != nil {
		return nil, bodyError(err, max)
	}
	return b, nil
}

// jsonError maps an error of json.Unmarshal(body) to a 400, telling apart
// an empty body, one cut short and one with data after its value.
func jsonError(body []byte, err error) *apiError {
	var (
		se *json.SyntaxError
		te *json.UnmarshalTypeError
	)
	switch {
	case len(bytes.TrimSpace(body)) == 0:
		return badRequest("", "invalid_json", "Request body is empty; expected a JSON object.")
	case errors.As(err, &se) && se.Offset > 0 && json.Valid(body[:se.Offset-1]):
		// Only the byte that failed is wrong: a whole value came before it.
		return badRequest("", "invalid_json", "Request body has data after the JSON value.")
	case errors.As(err, &se) && se.Offset >= int64(len(body)) && strings.HasPrefix(se.Error(), "unexpected end of JSON input"):
		// Offset points past the failing byte, so a wrong last byte
		// ({"a":1,}) has it too: only the decoder's message tells a body
		// cut short.
		return badRequest("", "invalid_json", "Request body is not valid JSON: it ends too early.")
	case errors.As(err, &se):
		return badRequest("", "invalid_json", "Request body is not valid JSON at byte %d: %v.", se.Offset, se)
	case errors.As(err, &te):
		if te.Field == "" {
			return badRequest("", "invalid_type", "Request body must be a JSON object, not %s.", te.Value)
		}
		return badRequest(te.Field, "invalid_type", "Invalid type for %q: expected %s, got %s.", te.Field, jsonKind(te.Type.String()), te.Value)
	}
	return badRequest("", "invalid_json", "Request body is not valid JSON: %v.", err)
}

// jsonKind names a Go type as a JSON client thinks of it.
func jsonKind(goType string) string {
	t := strings.TrimPrefix(goType, "*")
	switch {
	case t == "string":
		return "a string"
	case t == "bool":
		return "a boolean"
	case strings.HasPrefix(t, "int") || strings.HasPrefix(t, "uint"):
		return "an integer"
	case strings.HasPrefix(t, "float"):
		return "a number"
	case strings.HasPrefix(t, "[]"):
		return "an array"
	case strings.HasPrefix(t, "map["):
		return "an object"
	}
	return "an object"
}

// stringOrArray decodes a JSON string or array of strings; null or absent
// is nil.
func stringOrArray(raw json.RawMessage, field string) ([]string, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return []string{s}, nil
	}
	var arr []string
	if err := json.Unmarshal(raw, &arr); err == nil {
		return arr, nil
	}
	return nil, badRequest(field, "invalid_type", "Invalid type for %q: expected a string or an array of strings.", field)
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}
