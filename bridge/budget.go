package bridge

import (
	"fmt"
	"io"
	"net/http"
	"time"

	"golang.org/x/sync/semaphore"
)

// bodyBudget bounds the request-body bytes that all requests hold at once.
// Each body is bounded by WithMaxBody, but many at once are not: 30 clients
// sending 15 MiB bodies each used to push the bridge past 1.3 GB. A request
// reserves its body's bytes before the body is read and keeps them until
// its handler returns, since what was decoded from the body (an image, the
// text of the query) lives as long as the query; when the budget is spent
// the request is refused with 429 at once, its body never read.
type bodyBudget struct {
	sem        *semaphore.Weighted
	limit      int64
	retryAfter time.Duration
}

func newBodyBudget(limit int64, retryAfter time.Duration) *bodyBudget {
	return &bodyBudget{sem: semaphore.NewWeighted(limit), limit: limit, retryAfter: retryAfter}
}

// busy is the refusal of a request that does not fit in the budget.
func (b *bodyBudget) busy() *apiError {
	return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: "bridge_busy", RetryAfter: b.retryAfter,
		Message: fmt.Sprintf("The bridge is receiving as many request bodies as it holds at once (%d bytes in all); retry later.", b.limit)}
}

// declaredTooLarge refuses a body by its Content-Length, before a byte of
// it is read.
func declaredTooLarge(n, max int64) *apiError {
	return tooLarge("", "Request body is %d bytes (Content-Length), over the limit of %d bytes.", n, max)
}

// wrap bounds the bodies of the requests next serves: a declared
// Content-Length over max gets 413 at once; a body that does not fit in
// the budget gets 429 with Retry-After. A body of unknown length (chunked)
// reserves its bytes as they arrive.
func (b *bodyBudget) wrap(max int64, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := r.ContentLength
		switch {
		case n == 0 || r.Body == nil || r.Body == http.NoBody:
			next.ServeHTTP(w, r)
		case n > max:
			writeError(w, declaredTooLarge(n, max))
		case n > 0:
			if !b.sem.TryAcquire(n) {
				writeError(w, b.busy())
				return
			}
			defer b.sem.Release(n)
			next.ServeHTTP(w, r)
		default:
			mb := &meteredBody{ReadCloser: r.Body, b: b}
			r.Body = mb
			defer mb.release()
			next.ServeHTTP(w, r)
		}
	})
}

// meteredBody reserves budget for a body of unknown length as it is read;
// a read that does not fit fails with the 429 that bodyError passes on.
type meteredBody struct {
	io.ReadCloser
	b    *bodyBudget
	held int64
}

func (m *meteredBody) Read(p []byte) (int, error) {
	n, err := m.ReadCloser.Read(p)
	if n > 0 {
		if !m.b.sem.TryAcquire(int64(n)) {
			return 0, m.b.busy()
		}
		m.held += int64(n)
	}
	return n, err
}

// release gives back what was reserved; the handler has returned by then.
func (m *meteredBody) release() {
	if m.held > 0 {
		m.b.sem.Release(m.held)
		m.held = 0
	}
}
