// Package queue is the bridge's admission queue. It bounds the queries the
// bridge has in the swarm at once (a fixed number, or the swarm's capacity:
// the concurrency its workers announce) and lets the rest wait their turn,
// bounded in total and per client and served round robin across clients,
// so that one client's burst cannot starve the others. A query that cannot
// even wait is refused at once with a *BusyError that carries a retry hint.
//
// The bridge's HTTP endpoints and its WebSocket share one Queue: the
// request's context names the client (WithClient).
package queue

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/protocol"
)

// Defaults for the options.
const (
	DefaultMaxWaiting          = 1024
	DefaultMaxWaitingPerClient = 64
	DefaultMaxWait             = time.Minute
	DefaultRetryAfter          = 2 * time.Second
	DefaultUpdateInterval      = time.Second
	// capacityRefresh is how often a dynamic capacity is asked again: the
	// peer table changes at the pace of announcements (seconds).
	capacityRefresh = time.Second
	maxRetryAfter   = time.Minute
)

// Reasons a query is refused; a *BusyError wraps one of them.
var (
	ErrFull        = errors.New("the bridge's queue is full")
	ErrClientFull  = errors.New("this client has too many queries waiting")
	ErrWaitExpired = errors.New("waited too long in the bridge's queue")
	ErrClosed      = errors.New("the bridge is shutting down")
)

// BusyError refuses a query because the swarm is at capacity. It unwraps
// to the reason and to a protocol BUSY error, so protocol.AsError maps it
// to BUSY.
type BusyError struct {
	Reason     error         // ErrFull, ErrClientFull, ErrWaitExpired, or the swarm's own BUSY
	RetryAfter time.Duration // when a retry has a fair chance
	pe         *protocol.Error
}

func newBusy(reason error, retry time.Duration) *BusyError {
	return &BusyError{Reason: reason, RetryAfter: retry, pe: protocol.Errorf(protocol.CodeBusy, "%v", reason)}
}

// AsBusy wraps a BUSY error from the swarm with a retry hint; other errors
// pass unchanged.
func AsBusy(err error, retry time.Duration) error {
	var be *BusyError
	if err == nil || errors.As(err, &be) || protocol.AsError(err).Code != protocol.CodeBusy {
		return err
	}
	return &BusyError{Reason: err, RetryAfter: retry, pe: protocol.AsError(err)}
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("busy: %v (retry after %s)", e.Reason, e.RetryAfter.Round(time.Millisecond))
}

// Unwrap gives errors.Is/As the reason and the protocol error.
func (e *BusyError) Unwrap() []error { return []error{e.Reason, e.pe} }

// Position is where a waiting query stands.
type Position struct {
	Position int // 1 = the next to be admitted
	Waiting  int // queries waiting in all
	Running  int // queries admitted and not done
	Limit    int // queries admitted at once
}

// Stats is a snapshot for metrics and tests.
type Stats struct {
	Waiting, Running, Limit, Clients int
	Admitted, Refused, Expired       uint64
	MaxWaiting                       int // most ever waiting at once
}

type config struct {
	maxInFlight   int
	capacity      func() int
	maxWaiting    int
	perClient     int
	maxWait       time.Duration
	retryAfter    time.Duration
	updateEvery   time.Duration
	log           *logging.ZapEventLogger
	capacityEvery time.Duration
}

// Option configures a Queue.
type Option func(*config) error

// WithMaxInFlight admits at most n queries at once. It overrides
// WithCapacity.
func WithMaxInFlight(n int) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("max in flight %d must be >= 0 (0: the swarm's capacity)", n)
		}
		c.maxInFlight = n
		return nil
	}
}

// WithCapacity admits as many queries at once as f says (at least one), asked
// again every second: the bridge passes the sum of its workers' concurrency.
func WithCapacity(f func() int) Option {
	return func(c *config) error {
		if f == nil {
			return errors.New("nil capacity")
		}
		c.capacity = f
		return nil
	}
}

// WithMaxWaiting bounds the queries waiting in all; 0 refuses every query
// that finds no free slot.
func WithMaxWaiting(n int) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("queue size %d must be >= 0", n)
		}
		c.maxWaiting = n
		return nil
	}
}

// WithMaxWaitingPerClient bounds the queries one client has waiting.
func WithMaxWaitingPerClient(n int) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("per-client queue size %d must be > 0", n)
		}
		c.perClient = n
		return nil
	}
}

// WithMaxWait bounds how long a query waits for a slot; then it is refused
// BUSY, leaving the rest of its deadline unused.
func WithMaxWait(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("max wait %s must be > 0", d)
		}
		c.maxWait = d
		return nil
	}
}

// WithRetryAfter is the least retry hint a refusal carries; the hint grows
// with the queue (waiting queries × the time a query holds a slot / slots).
func WithRetryAfter(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("retry-after %s must be > 0", d)
		}
		c.retryAfter = d
		return nil
	}
}

// WithUpdateInterval sets how often waiting queries whose position changed
// are told their new one.
func WithUpdateInterval(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("update interval %s must be > 0", d)
		}
		c.updateEvery = d
		return nil
	}
}

// WithLogger replaces the "mtor/bridge/queue" logger.
func WithLogger(l *logging.ZapEventLogger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.log = l
		return nil
	}
}

// Queue admits queries. The zero value is not usable; use New.
type Queue struct {
	cfg        config
	refreshing atomic.Bool
	done       chan struct{} // closed by Close

	mu         sync.Mutex
	closed     bool
	limit      int
	limitAt    time.Time
	running    int
	waiting    int
	clients    map[string]*client // clients with queries waiting
	cursor     *client            // next client served; nil when none waits
	timer      *time.Timer        // position updates, armed while queries wait
	hold       time.Duration      // moving average of the time a query holds a slot
	admitted   uint64
	refused    uint64
	expired    uint64
	maxWaiting int
}

// client is one client's waiting queries, oldest first, and its place in
// the ring of clients with waiting queries.
type client struct {
	key        string
	fifo       []*Ticket
	next, prev *client
}

// New builds a queue. Without WithMaxInFlight or WithCapacity it admits one
// query at a time.
func New(opts ...Option) (*Queue, error) {
	cfg := config{
		maxWaiting:    DefaultMaxWaiting,
		perClient:     DefaultMaxWaitingPerClient,
		maxWait:       DefaultMaxWait,
		retryAfter:    DefaultRetryAfter,
		updateEvery:   DefaultUpdateInterval,
		capacityEvery: capacityRefresh,
		log:           logging.Logger("mtor/bridge/queue"),
	}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("queue: %w", err)
		}
	}
	return &Queue{cfg: cfg, clients: map[string]*client{}, done: make(chan struct{})}, nil
}

// Ticket is one query's place: waiting, then admitted, then done.
type Ticket struct {
	q      *Queue
	key    string
	notify func(Position)
	ready  chan struct{} // closed when admitted
	state  ticketState
	pos    int       // last position told
	since  time.Time // enqueued; never changes
	start  time.Time // admitted
}

type ticketState uint8

const (
	stateWaiting ticketState = iota
	stateAdmitted
	stateDone
)

// Enqueue asks for a slot for client key. It never blocks: the query is
// admitted at once, or waits (notify, when not nil, hears its position now
// and whenever it changes), or is refused with a *BusyError. The caller
// must call Done on a returned Ticket.
func (q *Queue) Enqueue(key string, notify func(Position)) (*Ticket, error) {
	q.refreshLimit()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, newBusy(ErrClosed, q.cfg.retryAfter)
	}
	t := &Ticket{q: q, key: key, notify: notify, ready: make(chan struct{}), since: time.Now()}
	if q.waiting == 0 && q.running < q.limit {
		q.admitLocked(t)
		q.mu.Unlock()
		return t, nil
	}
	c := q.clients[key]
	switch {
	case q.waiting >= q.cfg.maxWaiting:
		q.refused++
		retry := q.retryAfterLocked()
		q.mu.Unlock()
		return nil, newBusy(ErrFull, retry)
	case c != nil && len(c.fifo) >= q.cfg.perClient:
		q.refused++
		retry := q.retryAfterLocked()
		q.mu.Unlock()
		return nil, newBusy(ErrClientFull, retry)
	}
	if c == nil {
		c = &client{key: key}
		q.clients[key] = c
		q.linkLocked(c)
	}
	c.fifo = append(c.fifo, t)
	q.waiting++
	q.maxWaiting = max(q.maxWaiting, q.waiting)
	t.pos = q.positionLocked(c, len(c.fifo))
	p := Position{Position: t.pos, Waiting: q.waiting, Running: q.running, Limit: q.limit}
	if q.timer == nil {
		q.timer = time.AfterFunc(q.cfg.updateEvery, q.update)
	}
	q.mu.Unlock()
	if notify != nil {
		notify(p)
	}
	return t, nil
}

// Wait blocks until t is admitted (nil), ctx ends, the queue's max wait
// passes (a *BusyError) or the queue closes. Done must follow either way.
func (t *Ticket) Wait(ctx context.Context) error {
	select {
	case <-t.ready:
		return nil
	default:
	}
	timer := time.NewTimer(t.q.cfg.maxWait - time.Since(t.since))
	defer timer.Stop()
	var reason error
	select {
	case <-t.ready:
		return nil
	case <-ctx.Done():
		reason = ctx.Err()
	case <-timer.C:
		reason = ErrWaitExpired
	case <-t.q.done:
		reason = ErrClosed
	}
	q := t.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if t.state == stateAdmitted {
		return nil // admitted meanwhile: the caller's ctx tells the rest
	}
	q.leaveLocked(t)
	switch {
	case errors.Is(reason, context.DeadlineExceeded):
		// The query's own deadline ran out while it waited: that is
		// overload too, not a failure of anybody's.
		q.expired++
		return newBusy(fmt.Errorf("%w (its deadline passed after %s)", ErrWaitExpired, time.Since(t.since).Round(time.Millisecond)), q.retryAfterLocked())
	case errors.Is(reason, ErrWaitExpired):
		q.expired++
		return newBusy(fmt.Errorf("%w (%s)", ErrWaitExpired, q.cfg.maxWait), q.retryAfterLocked())
	case errors.Is(reason, ErrClosed):
		return newBusy(ErrClosed, q.cfg.retryAfter)
	}
	return fmt.Errorf("waiting in the bridge's queue: %w", reason)
}

// Done gives the slot back, or leaves the queue. It may be called more than
// once.
func (t *Ticket) Done() {
	q := t.q
	q.mu.Lock()
	defer q.mu.Unlock()
	switch t.state {
	case stateWaiting:
		q.leaveLocked(t)
	case stateAdmitted:
		t.state = stateDone
		q.running--
		held := time.Since(t.start)
		if q.hold == 0 {
			q.hold = held
		} else {
			q.hold += (held - q.hold) / 8
		}
		q.dispatchLocked()
	}
}

// RetryAfter is the retry hint for a query refused now.
func (q *Queue) RetryAfter() time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.retryAfterLocked()
}

// retryAfterLocked estimates when the queue will have room: the queries
// waiting times the time a query holds a slot, over the slots.
func (q *Queue) retryAfterLocked() time.Duration {
	d := q.cfg.retryAfter
	if q.hold > 0 && q.limit > 0 {
		d = max(d, time.Duration(int64(q.hold)*int64(q.waiting+1)/int64(q.limit)))
	}
	return min(d, maxRetryAfter)
}

// Stats is a snapshot of the queue.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return Stats{Waiting: q.waiting, Running: q.running, Limit: q.limit, Clients: len(q.clients),
		Admitted: q.admitted, Refused: q.refused, Expired: q.expired, MaxWaiting: q.maxWaiting}
}

// Close refuses new queries and wakes every waiting one with a *BusyError.
func (q *Queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	q.closed = true
	close(q.done)
	if q.timer != nil {
		q.timer.Stop()
		q.timer = nil
	}
}

func (q *Queue) admitLocked(t *Ticket) {
	t.state = stateAdmitted
	t.start = time.Now() // from here it holds a slot
	q.running++
	q.admitted++
	close(t.ready)
}

// dispatchLocked admits waiting queries while slots are free, one per
// client in turn.
func (q *Queue) dispatchLocked() {
	for q.running < q.limit && q.cursor != nil {
		c := q.cursor
		t := c.fifo[0]
		c.fifo[0] = nil
		c.fifo = c.fifo[1:]
		q.waiting--
		q.cursor = c.next
		if len(c.fifo) == 0 {
			q.unlinkLocked(c)
		}
		q.admitLocked(t)
	}
}

// leaveLocked takes a waiting ticket out of its client's queue.
func (q *Queue) leaveLocked(t *Ticket) {
	t.state = stateDone
	c := q.clients[t.key]
	if c == nil {
		return
	}
	for i, w := range c.fifo {
		if w == t {
			c.fifo = append(c.fifo[:i], c.fifo[i+1:]...)
			c.fifo[len(c.fifo):cap(c.fifo)][0] = nil // drop the stale reference
			q.waiting--
			break
		}
	}
	if len(c.fifo) == 0 {
		if q.cursor == c {
			q.cursor = c.next
		}
		q.unlinkLocked(c)
	}
}

// linkLocked puts c last in the round (just before the cursor).
func (q *Queue) linkLocked(c *client) {
	if q.cursor == nil {
		c.next, c.prev = c, c
		q.cursor = c
		return
	}
	last := q.cursor.prev
	c.prev, c.next = last, q.cursor
	last.next = c
	q.cursor.prev = c
}

// unlinkLocked removes c from the ring and the map; its slice goes with it.
func (q *Queue) unlinkLocked(c *client) {
	delete(q.clients, c.key)
	if c.next == c {
		q.cursor = nil
	} else {
		c.prev.next = c.next
		c.next.prev = c.prev
		if q.cursor == c {
			q.cursor = c.next
		}
	}
	c.next, c.prev, c.fifo = nil, nil, nil
}

// positionLocked is the position of client c's k-th waiting query (1-based)
// under round robin from the cursor: clients served before c in the round
// give up to k queries ahead of it, those after c up to k-1.
func (q *Queue) positionLocked(c *client, k int) int {
	pos := k
	before := true
	for o := q.cursor; ; o = o.next {
		if o == c {
			before = false
		} else if before {
			pos += min(len(o.fifo), k)
		} else {
			pos += min(len(o.fifo), k-1)
		}
		if o.next == q.cursor {
			break
		}
	}
	return pos
}

type told struct {
	t *Ticket
	p Position
}

// update tells waiting queries whose position changed their new one, and
// re-arms itself while queries wait.
func (q *Queue) update() {
	q.refreshLimit()
	q.mu.Lock()
	q.timer = nil
	if q.closed || q.cursor == nil {
		q.mu.Unlock()
		return
	}
	// Walk the rounds: round r takes each client's r-th query, in ring order
	// from the cursor. O(waiting + clients).
	var order []*client
	for o := q.cursor; ; o = o.next {
		order = append(order, o)
		if o.next == q.cursor {
			break
		}
	}
	var out []told
	pos := 0
	for r := 0; len(order) > 0; r++ {
		n := 0
		for _, c := range order {
			if r >= len(c.fifo) {
				continue
			}
			pos++
			if t := c.fifo[r]; t.pos != pos {
				t.pos = pos
				if t.notify != nil {
					out = append(out, told{t, Position{Position: pos, Waiting: q.waiting, Running: q.running, Limit: q.limit}})
				}
			}
			order[n] = c
			n++
		}
		order = order[:n]
	}
	q.timer = time.AfterFunc(q.cfg.updateEvery, q.update)
	q.mu.Unlock()
	for _, o := range out {
		o.t.notify(o.p)
	}
}

// refreshLimit asks the capacity again when it is stale; one caller at a
// time, outside the lock (it reads the peer table).
func (q *Queue) refreshLimit() {
	q.mu.Lock()
	if q.cfg.maxInFlight > 0 || q.cfg.capacity == nil {
		if q.limit == 0 {
			q.limit = max(q.cfg.maxInFlight, 1)
		}
		q.mu.Unlock()
		return
	}
	stale := time.Since(q.limitAt) >= q.cfg.capacityEvery
	q.mu.Unlock()
	if !stale || !q.refreshing.CompareAndSwap(false, true) {
		return
	}
	defer q.refreshing.Store(false)
	n := max(q.cfg.capacity(), 1)
	q.mu.Lock()
	defer q.mu.Unlock()
	if n != q.limit && q.limit != 0 {
		q.cfg.log.Debugw("admission limit changed", "from", q.limit, "to", n)
	}
	q.limit, q.limitAt = n, time.Now()
	q.dispatchLocked()
}

type clientKey struct{}

// Client names who asks, for fairness, and how to tell a waiting query its
// position.
type Client struct {
	Key    string
	Notify func(Position)
}

// WithClient returns ctx naming the client of the queries run with it.
func WithClient(ctx context.Context, c Client) context.Context {
	return context.WithValue(ctx, clientKey{}, c)
}

// ClientFrom is the client ctx names; the empty key when none.
func ClientFrom(ctx context.Context) Client {
	c, _ := ctx.Value(clientKey{}).(Client)
	return c
}
