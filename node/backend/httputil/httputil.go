// Package httputil holds what the HTTP backends (ollama, openai, ...) share:
// one exchange with a watchdog so that a silent server never hangs a query,
// the mapping of transport failures and HTTP statuses to typed protocol
// errors, and bounded readers for JSON bodies, NDJSON lines and SSE events.
package httputil

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/mtor-swarm/mtor/protocol"
)

// Limits on what a backend may send back.
const (
	// MaxErrorBody bounds the body read from a failed response.
	MaxErrorBody = 64 << 10
	// MaxMessage bounds the backend message quoted in a typed error.
	MaxMessage = 1024
	// MaxMedia bounds one media result so that it fits in an Event frame.
	MaxMedia = protocol.MaxEventFrame - 4<<10
	// MaxLine bounds one NDJSON line or SSE event of a token stream.
	MaxLine = 1 << 20
)

// Errors distinguishing why the watchdog ended an exchange.
var (
	errStalled = errors.New("backend stalled")
)

// Exchange is one HTTP request to a backend and its response, guarded by a
// watchdog timer: the response headers must arrive within the first
// timeout; then, for a stream, each read must make progress within the idle
// timeout. When the timer fires the request is cancelled, so a backend that
// stops talking ends the query with an error instead of hanging it.
type Exchange struct {
	Resp *http.Response

	parent context.Context
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	wait   time.Duration // the timeout in force, for messages
	idle   time.Duration
}

// Send performs req (built without a context) under ctx. first bounds the
// wait for response headers; idle, when positive, bounds each silence
// while reading a streamed body (otherwise first keeps running as a cap on
// the whole exchange). A transport failure or an HTTP status >= 400 is
// returned as a typed error; the caller must Close a returned Exchange.
func Send(ctx context.Context, client *http.Client, req *http.Request, first, idle time.Duration) (*Exchange, error) {
	x := &Exchange{parent: ctx, idle: idle, wait: first}
	x.ctx, x.cancel = context.WithCancelCause(ctx)
	x.timer = time.AfterFunc(first, func() { x.cancel(errStalled) })
	resp, err := client.Do(req.WithContext(x.ctx))
	if err != nil {
		x.Close()
		return nil, x.Err(err)
	}
	x.Resp = resp
	if resp.StatusCode >= 400 {
		defer x.Close()
		return nil, x.statusError()
	}
	if idle > 0 {
		x.wait = idle
		x.timer.Reset(idle)
	}
	return x, nil
}

// Body is the response body; for a stream every read that makes progress
// re-arms the idle timer.
func (x *Exchange) Body() io.Reader { return kicker{x} }

type kicker struct{ x *Exchange }

func (k kicker) Read(p []byte) (int, error) {
	n, err := k.x.Resp.Body.Read(p)
	if n > 0 && k.x.idle > 0 {
		k.x.timer.Reset(k.x.idle)
	}
	return n, err
}

// Close releases the exchange: it stops the timer, cancels the request and
// closes the body. It is safe to call more than once.
func (x *Exchange) Close() {
	x.timer.Stop()
	x.cancel(context.Canceled)
	if x.Resp != nil {
		_ = x.Resp.Body.Close()
	}
}

// Err maps an error met during the exchange to a typed error: the query's
// own cancellation or deadline first, then the watchdog, then the transport.
func (x *Exchange) Err(err error) *protocol.Error {
	if err == nil {
		return nil
	}
	var pe *protocol.Error
	if errors.As(err, &pe) {
		return pe
	}
	if ctxErr := ContextError(x.parent); ctxErr != nil {
		return ctxErr
	}
	if errors.Is(context.Cause(x.ctx), errStalled) {
		return protocol.Errorf(protocol.CodeBackendError, "backend sent nothing for %s", x.wait)
	}
	return TransportError(err)
}

// ContextError is the typed error for a done ctx (TIMEOUT or CANCELLED),
// or nil while ctx is live.
func ContextError(ctx context.Context) *protocol.Error {
	switch ctx.Err() {
	case nil:
		return nil
	case context.DeadlineExceeded:
		return protocol.Errorf(protocol.CodeTimeout, "deadline exceeded")
	default:
		return protocol.Errorf(protocol.CodeCancelled, "cancelled")
	}
}

// TransportError maps a failure to reach or read the backend: refused or
// reset connections and cut streams are BACKEND_ERROR (retryable: another
// worker can answer), a network timeout is TIMEOUT.
func TransportError(err error) *protocol.Error {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return protocol.Errorf(protocol.CodeBackendError, "backend refused the connection: %v", err)
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF):
		return protocol.Errorf(protocol.CodeBackendError, "backend closed the connection mid-answer: %v", err)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return protocol.Errorf(protocol.CodeTimeout, "backend timed out: %v", err)
	}
	return protocol.Errorf(protocol.CodeBackendError, "backend: %v", err)
}

// statusError reads a bounded error body and maps the status.
func (x *Exchange) statusError() *protocol.Error {
	body, _ := io.ReadAll(io.LimitReader(x.Resp.Body, MaxErrorBody))
	return StatusError(x.Resp.StatusCode, body)
}

// StatusError maps an HTTP error status and its body to a typed error
// carrying the backend's own message:
//
//	404, 405, 501    UNSUPPORTED (no such model, or the server lacks the endpoint)
//	408, 504         TIMEOUT
//	413              TOO_LARGE
//	429, 503         BUSY (the server is overloaded or still loading)
//	401, 403         BACKEND_ERROR (the worker's credentials, not the query, are wrong)
//	other 4xx        BAD_REQUEST
//	other 5xx        BACKEND_ERROR
func StatusError(status int, body []byte) *protocol.Error {
	msg := ErrorMessage(body)
	if msg == "" {
		msg = http.StatusText(status)
	}
	code := protocol.CodeBackendError
	switch {
	case status == http.StatusNotFound || status == http.StatusMethodNotAllowed || status == http.StatusNotImplemented:
		code = protocol.CodeUnsupported
	case status == http.StatusRequestTimeout || status == http.StatusGatewayTimeout:
		code = protocol.CodeTimeout
	case status == http.StatusRequestEntityTooLarge:
		code = protocol.CodeTooLarge
	case status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable:
		code = protocol.CodeBusy
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		code = protocol.CodeBackendError
	case status >= 400 && status < 500:
		code = protocol.CodeBadRequest
	}
	return protocol.Errorf(code, "backend answered %d: %s", status, msg)
}

// ErrorMessage extracts a human message from an error body in the shapes
// servers use ({"error":{"message":...}}, {"error":"..."}, {"message":...},
// {"detail":...}) or, failing that, its text; bounded and valid UTF-8.
func ErrorMessage(body []byte) string {
	var v struct {
		Error   json.RawMessage `json:"error"`
		Message string          `json:"message"`
		Detail  json.RawMessage `json:"detail"`
	}
	msg := ""
	if json.Unmarshal(body, &v) == nil {
		var s string
		var obj struct {
			Message string `json:"message"`
		}
		switch {
		case json.Unmarshal(v.Error, &obj) == nil && obj.Message != "":
			msg = obj.Message
		case json.Unmarshal(v.Error, &s) == nil && s != "":
			msg = s
		case v.Message != "":
			msg = v.Message
		case json.Unmarshal(v.Detail, &s) == nil && s != "":
			msg = s
		case len(v.Detail) > 0:
			msg = string(v.Detail)
		}
	}
	if msg == "" {
		msg = string(body)
	}
	return Clip(strings.TrimSpace(msg), MaxMessage)
}

// Clip shortens s to at most n bytes of valid UTF-8.
func Clip(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// ReadJSON decodes one JSON value of at most max bytes from r. A body over
// the limit or not valid JSON is a BACKEND_ERROR; read failures are mapped
// by x.
func (x *Exchange) ReadJSON(max int64, v any) error {
	data, err := ReadAll(x, max)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return protocol.Errorf(protocol.CodeBackendError, "backend sent malformed JSON: %v", err)
	}
	return nil
}

// ReadAll reads the whole body, refusing more than max bytes.
func ReadAll(x *Exchange, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(x.Body(), max+1))
	if err != nil {
		return nil, x.Err(err)
	}
	if int64(len(data)) > max {
		return nil, protocol.Errorf(protocol.CodeTooLarge, "backend response exceeds %d bytes", max)
	}
	return data, nil
}

// NewJSONRequest builds a POST with a JSON body.
func NewJSONRequest(url string, body any) (*http.Request, error) {
	data, err := json.Marshal(body)
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeInternal, "encode backend request: %v", err)
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(data))
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeInternal, "build backend request: %v", err)
	}
	req.Header.Set("Content-Type", "application/json")
	return req, nil
}

// NewGetRequest builds a GET.
func NewGetRequest(url string) (*http.Request, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeInternal, "build backend request: %v", err)
	}
	return req, nil
}

// Malformed is the error for a stream that is not what the API promises.
func Malformed(format string, args ...any) *protocol.Error {
	return protocol.Errorf(protocol.CodeBackendError, "backend sent a malformed stream: %s", fmt.Sprintf(format, args...))
}

// Truncated is the error for a stream that ended before the answer did.
func Truncated() *protocol.Error {
	return protocol.Errorf(protocol.CodeBackendError, "backend stream ended before the answer was complete")
}
