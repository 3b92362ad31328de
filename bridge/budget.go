package bridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
)

// bodyBudget bounds the request-body memory that all requests hold at
// once. Each body is bounded by WithMaxBody, but many at once are not: 30
// clients sending 15 MiB bodies each used to push the bridge past 1.3 GB.
//
// A body's buffer grows as its bytes arrive, and each growth is reserved
// first (see readAll), so the bridge never holds more than clients have
// actually sent it: a client that declares 16 MiB and sends nothing holds
// 64 KiB, and stalled uploads cannot lock others out for free. What a
// request reserved stays reserved until its handler returns, since what
// is decoded from the body (an image, the query's text) lives as long as
// the query. A growth that does not fit refuses the request with 429.
type bodyBudget struct {
	sem        *semaphore.Weighted
	limit      int64
	retryAfter time.Duration
	held       atomic.Int64 // what is reserved now, for the metrics
}

func newBodyBudget(limit int64, retryAfter time.Duration) *bodyBudget {
	return &bodyBudget{sem: semaphore.NewWeighted(limit), limit: limit, retryAfter: retryAfter}
}

// inUse is the bytes reserved now.
func (b *bodyBudget) inUse() int64 { return b.held.Load() }

// busy is the refusal of a request whose body does not fit.
func (b *bodyBudget) busy() *apiError {
	return &apiError{Status: http.StatusTooManyRequests, Type: typeRateLimit, Code: "bridge_busy", RetryAfter: b.retryAfter,
		Message: fmt.Sprintf("The bridge holds as many request bodies as it may at once (%d bytes in all); retry later.", b.limit)}
}

// declaredTooLarge refuses a body by its Content-Length, before a byte of
// it is read.
func declaredTooLarge(n, max int64) *apiError {
	return tooLarge("", "Request body is %d bytes (Content-Length), over the limit of %d bytes.", n, max)
}

// wrap bounds the bodies of the requests next serves: a declared
// Content-Length over max gets 413 at once, unread; any other body gets a
// reservation in its context for readAll to grow, given back when next
// returns.
func (b *bodyBudget) wrap(max int64, next http.Handler, fail errorWriter) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch n := r.ContentLength; {
		case n > max:
			fail(w, declaredTooLarge(n, max))
		case n == 0 || r.Body == nil || r.Body == http.NoBody:
			next.ServeHTTP(w, r)
		default:
			res := &reservation{b: b}
			defer res.release()
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), reservationKey{}, res)))
		}
	})
}

// reservation is what one request holds of the budget.
type reservation struct {
	b    *bodyBudget
	held int64
}

type reservationKey struct{}

// reservationOf is r's reservation, or nil for a request that came another
// way than through bodyBudget.wrap (nil reserves nothing).
func reservationOf(r *http.Request) *reservation {
	res, _ := r.Context().Value(reservationKey{}).(*reservation)
	return res
}

// grow reserves n more bytes, or fails with the 429 of a busy bridge.
func (res *reservation) grow(n int64) error {
	if res == nil || n <= 0 {
		return nil
	}
	if !res.b.sem.TryAcquire(n) {
		return res.b.busy()
	}
	res.held += n
	res.b.held.Add(n)
	return nil
}

func (res *reservation) release() {
	if res.held > 0 {
		res.b.held.Add(-res.held)
		res.b.sem.Release(res.held)
		res.held = 0
	}
}

// firstRead is the buffer a body starts with when it is not smaller.
const firstRead = 64 << 10

// readAll reads r to its end like io.ReadAll, into a buffer that doubles
// as bytes arrive, reserving each growth from res first. hint is the
// length to expect (a declared length, or a guess; < 0 for none): the
// buffer's sizes are then hint halved down to 64 KiB, so that a body of
// exactly hint bytes ends in a buffer of exactly that size, after about
// hint bytes of smaller buffers, and more than hint still fits. Its end is
// found with a one-byte read rather than by growing.
func readAll(r io.Reader, hint int64, res *reservation) ([]byte, error) {
	size := int64(firstRead)
	if hint >= 0 {
		size = hint
		for size > firstRead {
			size = (size + 1) / 2
		}
	}
	if err := res.grow(size); err != nil {
		return nil, err
	}
	b := make([]byte, 0, size)
	for {
		if len(b) < cap(b) {
			n, err := r.Read(b[len(b):cap(b)])
			b = b[:len(b)+n]
			if errors.Is(err, io.EOF) {
				return b, nil
			}
			if err != nil {
				return b, err
			}
			continue
		}
		var probe [1]byte
		if _, err := io.ReadFull(r, probe[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return b, nil
			}
			return b, err
		}
		next := max(2*int64(cap(b)), firstRead)
		if hint > int64(cap(b)) {
			// The size above cap on the ladder from hint down.
			next = hint
			for (next+1)/2 > int64(cap(b)) {
				next = (next + 1) / 2
			}
		}
		if err := res.grow(next - int64(cap(b))); err != nil {
			return b, err
		}
		nb := make([]byte, len(b), next)
		copy(nb, b)
		b = append(nb, probe[0])
	}
}
