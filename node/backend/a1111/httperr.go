// HTTP failure mapping to typed protocol errors. The same rules live in
// node/backend/rentahal/httperr.go; keep them in step (or move both into a shared
// package).

package a1111

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"unicode"
	"unicode/utf8"

	"github.com/mtor-swarm/mtor/protocol"
)

// maxErrorBody bounds how much of an error answer is read; maxErrorMessage
// bounds how much of it reaches the client.
const (
	maxErrorBody    = 64 << 10
	maxErrorMessage = 512
)

var errBodyTooLarge = errors.New("answer exceeds the size limit")

// readBody reads at most limit bytes; a longer body is an error rather than
// a silently truncated answer.
func readBody(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%w (%d bytes)", errBodyTooLarge, limit)
	}
	return b, nil
}

// transportError maps a failed request or body read to a typed error. ctx is
// the request's own context, so its state says whether we gave up (timeout)
// or the caller did (cancel). The message names no address: it reaches the
// client, who has no business knowing where the worker's backend lives.
func transportError(ctx context.Context, what string, err error) *protocol.Error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return protocol.Errorf(protocol.CodeCancelled, "%s: cancelled", what)
	}
	var ne net.Error
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout()) {
		return protocol.Errorf(protocol.CodeTimeout, "%s: no answer before the deadline", what)
	}
	if errors.Is(err, errBodyTooLarge) {
		return protocol.Errorf(protocol.CodeBackendError, "%s: %v", what, err)
	}
	return protocol.Errorf(protocol.CodeBackendError, "%s: %s", what, describe(err))
}

// describe names the kind of a connection failure without its addresses.
func describe(err error) string {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "connection closed mid-answer"
	case errors.As(err, &dnsErr):
		return "host not found"
	}
	return "connection failed"
}

// statusError maps a non-success HTTP status to a typed error carrying the
// backend's own message. 4xx means the backend refused this request (so
// another worker would too), except for the few codes that say otherwise.
func statusError(what string, status int, body []byte) *protocol.Error {
	msg := backendMessage(body)
	if msg == "" {
		msg = http.StatusText(status)
	}
	switch {
	case status == http.StatusRequestTimeout:
		return protocol.Errorf(protocol.CodeTimeout, "%s: HTTP %d: %s", what, status, msg)
	case status == http.StatusRequestEntityTooLarge:
		return protocol.Errorf(protocol.CodeTooLarge, "%s: HTTP %d: %s", what, status, msg)
	case status == http.StatusTooManyRequests:
		return protocol.Errorf(protocol.CodeBusy, "%s: HTTP %d: %s", what, status, msg)
	case status >= 400 && status < 500:
		return protocol.Errorf(protocol.CodeBadRequest, "%s: HTTP %d: %s", what, status, msg)
	}
	return protocol.Errorf(protocol.CodeBackendError, "%s: HTTP %d: %s", what, status, msg)
}

// backendMessage extracts the human message of an error body. A1111 answers
// {"error": type name, "detail": ..., "body": ..., "errors": str(exception)};
// "errors" comes before "error", which is only the exception's type name.
// Other shapes: {"message": ...}, {"error": {"message": ...}}, raw text.
// Cleaned and bounded.
func backendMessage(body []byte) string {
	var obj map[string]json.RawMessage
	if json.Unmarshal(body, &obj) == nil {
		for _, k := range []string{"detail", "errors", "error", "message"} {
			raw, ok := obj[k]
			if !ok {
				continue
			}
			var s string
			if json.Unmarshal(raw, &s) == nil {
				if s != "" {
					return clean(s)
				}
				continue
			}
			var nested struct {
				Message string `json:"message"`
			}
			if json.Unmarshal(raw, &nested) == nil && nested.Message != "" {
				return clean(nested.Message)
			}
			return clean(string(raw)) // e.g. FastAPI's list of validation errors
		}
	}
	return clean(string(body))
}

// clean makes text safe to show: valid UTF-8, no control characters,
// trimmed, at most maxErrorMessage bytes.
func clean(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > maxErrorMessage {
		cut := maxErrorMessage
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "…"
	}
	return s
}
