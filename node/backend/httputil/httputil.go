// Package httputil holds what the HTTP backends (ollama, openai, rentahal,
// a1111) share: one exchange with a watchdog so that a silent server never
// hangs a query, the mapping of transport failures and HTTP statuses to
// typed protocol errors that never name the backend's address, and bounded
// readers for JSON bodies, NDJSON lines and SSE events.
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

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
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

var log = logging.Logger("mtor/backend/http")

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

	opts   options
	url    string // redacted, for the operator's log only
	parent context.Context
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	wait   time.Duration // the timeout in force, for messages
	idle   time.Duration
	flow   bool // the body's first bytes came: idle bounds each silence now
}

// An Option adjusts how Send treats a backend's answer.
type Option func(*options)

type options struct {
	pass  map[int]bool
	codes map[int]pb.ErrorCode
}

// PassStatus hands responses with these statuses to the caller (which reads
// x.Resp.StatusCode) instead of failing, for a caller that acts on them,
// e.g. by trying another spelling of a route on 404.
func PassStatus(statuses ...int) Option {
	return func(o *options) {
		if o.pass == nil {
			o.pass = map[int]bool{}
		}
		for _, s := range statuses {
			o.pass[s] = true
		}
	}
}

// MapStatus maps an HTTP status to code instead of StatusError's default,
// for an API that gives the status a meaning of its own.
func MapStatus(status int, code pb.ErrorCode) Option {
	return func(o *options) {
		if o.codes == nil {
			o.codes = map[int]pb.ErrorCode{}
		}
		o.codes[status] = code
	}
}

// Send performs req (built without a context) under ctx. first bounds the
// wait for the answer to start: its headers and, with idle positive, the
// first bytes of its body, since a server may send its headers at once and
// then wait for a queue slot or a long prefill (vLLM, llama.cpp). idle,
// when positive, bounds each silence after that while reading a streamed
// body (otherwise first keeps running as a cap on the whole exchange). A transport failure or an HTTP status >= 400 is
// returned as a typed error; the caller must Close a returned Exchange.
func Send(ctx context.Context, client *http.Client, req *http.Request, first, idle time.Duration, opts ...Option) (*Exchange, error) {
	x := &Exchange{parent: ctx, idle: idle, wait: first, url: req.URL.Redacted()}
	for _, o := range opts {
		o(&x.opts)
	}
	x.ctx, x.cancel = context.WithCancelCause(ctx)
	x.timer = time.AfterFunc(first, func() { x.cancel(errStalled) })
	resp, err := client.Do(req.WithContext(x.ctx))
	if err != nil {
		x.Close()
		return nil, x.Err(err)
	}
	x.Resp = resp
	if resp.StatusCode >= 400 && !x.opts.pass[resp.StatusCode] {
		defer x.Close()
		return nil, x.QueryError()
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
		if !k.x.flow {
			k.x.flow, k.x.wait = true, k.x.idle
		}
		k.x.timer.Reset(k.x.idle)
	}
	return n, err
}

// Bounds of Finish: what it reads past the end of an answer, and how long
// it waits for the body's end.
const (
	maxDrain  = 4 << 10
	drainWait = 25 * time.Millisecond
)

// Finish reads what is left of a body whose answer is complete (a stream
// past its [DONE]), at most maxDrain bytes within drainWait, so that the
// transport sees the body's end and keeps the connection for the next
// query: a body closed before its end closes the connection, and a server
// that flushes each event sends the end of its chunked body after the
// last event. A body that does not end within the bounds is left to
// Close. Call it only when nothing more is expected.
func (x *Exchange) Finish() {
	if x.Resp == nil {
		return
	}
	x.timer.Reset(drainWait)
	_, _ = io.CopyN(io.Discard, x.Resp.Body, maxDrain)
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
	// The typed error names no address; the operator's log keeps the cause.
	log.Debugw("backend transport failure", "url", x.url, "err", err)
	return TransportError(err)
}

// ContextError is the typed error for a done ctx (TIMEOUT or CANCELLED),
// or nil while ctx is live. A ctx past its deadline counts as timed out even
// before its own timer has fired, so that the watchdog, racing that timer,
// cannot turn the query's deadline into a BACKEND_ERROR.
func ContextError(ctx context.Context) *protocol.Error {
	err := ctx.Err()
	if dl, ok := ctx.Deadline(); ok && err == nil && !time.Now().Before(dl) {
		err = context.DeadlineExceeded
	}
	switch err {
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
// worker can answer), a network timeout is TIMEOUT. The message names the
// kind of failure only: the error's own text carries the backend's URL or
// address, which must not reach clients.
func TransportError(err error) *protocol.Error {
	var ne net.Error
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return protocol.Errorf(protocol.CodeBackendError, "backend unreachable: connection refused")
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF):
		return protocol.Errorf(protocol.CodeBackendError, "backend closed the connection mid-answer")
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return protocol.Errorf(protocol.CodeTimeout, "backend timed out")
	case errors.As(err, &dnsErr):
		return protocol.Errorf(protocol.CodeBackendError, "backend unreachable: host not found")
	}
	return protocol.Errorf(protocol.CodeBackendError, "backend connection failed")
}

// QueryError is StatusError for an answer to a query: a 500, which a
// server answers when one input makes it fail, is a backend.AnsweredError
// (it says nothing of the server's health); other statuses say what they
// say (401 and 403: the worker's credentials; 502 and 504: a gateway
// before a server that is gone; 503 and 429: busy).
func (x *Exchange) QueryError() error {
	pe := x.StatusError()
	if x.Resp.StatusCode == http.StatusInternalServerError {
		return backend.Answered(pe)
	}
	return pe
}

// StatusError reads a bounded error body and maps the response's status as
// Send does, with its MapStatus options: for a status that Send passed, or
// a success status the caller does not expect.
func (x *Exchange) StatusError() *protocol.Error {
	body, _ := io.ReadAll(io.LimitReader(x.Resp.Body, MaxErrorBody))
	pe := StatusError(x.Resp.StatusCode, body)
	if code, ok := x.opts.codes[x.Resp.StatusCode]; ok && code != pe.Code {
		pe = protocol.Errorf(code, "%s", pe.Message)
	}
	return pe
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
//
// A backend whose API means something else by a status says so with
// MapStatus.
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

// errorKeys are the members that carry an error body's message, in the
// order they are tried: FastAPI's "detail"; A1111's "errors", before its
// "error" (only the exception's type name there); then "error" as a string
// (Ollama) or an object with a message (OpenAI); then "message" (vLLM).
var errorKeys = []string{"detail", "errors", "error", "message"}

// ErrorMessage extracts a human message from an error body in the shapes
// servers use ({"detail":...}, {"errors":"..."}, {"error":{"message":...}},
// {"error":"..."}, {"message":...}) or, failing that, its text; cleaned and
// bounded (see Clean). An HTML page is named by its title: its markup in
// a node's start-up line, `mtor peers` or an error would bury the point,
// which is that the URL is not a model server's API.
func ErrorMessage(body []byte) string {
	var obj map[string]json.RawMessage
	if json.Unmarshal(body, &obj) == nil {
		for _, k := range errorKeys {
			if msg := member(obj[k]); msg != "" {
				return Clean(msg, MaxMessage)
			}
		}
	}
	if page, ok := HTMLPage(body); ok {
		return Clean(page+", not an API's error: is the URL the model server's API?", MaxMessage)
	}
	return Clean(string(body), MaxMessage)
}

// HTMLPage describes an HTML body ("an HTML page titled ..."), reporting
// false for anything else.
func HTMLPage(body []byte) (string, bool) {
	t := bytes.TrimSpace(body)
	lower := bytes.ToLower(t[:min(len(t), 512)])
	if !bytes.HasPrefix(lower, []byte("<!doctype html")) && !bytes.HasPrefix(lower, []byte("<html")) {
		return "", false
	}
	const not = "an HTML page"
	lower = bytes.ToLower(t)
	i := bytes.Index(lower, []byte("<title>"))
	if i < 0 {
		return not, true
	}
	rest := t[i+len("<title>"):]
	j := bytes.Index(bytes.ToLower(rest), []byte("</title>"))
	if j < 0 {
		return not, true
	}
	title := strings.Join(strings.Fields(string(rest[:j])), " ")
	if title == "" {
		return not, true
	}
	return fmt.Sprintf("an HTML page titled %q", title), true
}

// member is the message in one member of an error body: a string, an
// object's "message", or a structure (FastAPI's list of validation errors)
// as JSON text; "" for none.
func member(raw json.RawMessage) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return strings.TrimSpace(s)
	}
	var nested struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(raw, &nested) == nil && strings.TrimSpace(nested.Message) != "" {
		return nested.Message
	}
	if (raw[0] == '[' || raw[0] == '{') && len(raw) > 2 {
		return string(raw)
	}
	return ""
}

// Clean makes backend text safe to show a client (protocol.CleanText).
func Clean(s string, n int) string { return protocol.CleanText(s, n) }

// Clip shortens s to at most n bytes of valid UTF-8 (protocol.ClipText).
func Clip(s string, n int) string { return protocol.ClipText(s, n) }

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
		return nil, badURL()
	}
	req.Header.Set("Content-Type", "application/json")
	return req, nil
}

// NewGetRequest builds a GET.
func NewGetRequest(url string) (*http.Request, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, badURL()
	}
	return req, nil
}

// badURL is the error for a request that cannot be built; the parse error
// would quote the backend's URL, so only the operator's log may hold it.
func badURL() *protocol.Error {
	return protocol.Errorf(protocol.CodeInternal, "build backend request: invalid backend URL")
}

// Malformed is the error for a stream that is not what the API promises.
func Malformed(format string, args ...any) *protocol.Error {
	return protocol.Errorf(protocol.CodeBackendError, "backend sent a malformed stream: %s", fmt.Sprintf(format, args...))
}

// Truncated is the error for a stream that ended before the answer did.
func Truncated() *protocol.Error {
	return protocol.Errorf(protocol.CodeBackendError, "backend stream ended before the answer was complete")
}
