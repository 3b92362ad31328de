package queue

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
)

const waitLimit = 10 * time.Second

func mustNew(t *testing.T, opts ...Option) *Queue {
	t.Helper()
	q, err := New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Close)
	return q
}

func admitted(t *Ticket) bool {
	select {
	case <-t.ready:
		return true
	default:
		return false
	}
}

func TestRefusals(t *testing.T) {
	tests := []struct {
		name      string
		opts      []Option
		enqueue   []string // client keys, in order
		wantErr   []error  // per enqueue: nil (admitted or waiting) or the reason
		wantAdmit int
	}{
		{"admits up to the limit, then queues", []Option{WithMaxInFlight(2)},
			[]string{"a", "b", "c"}, []error{nil, nil, nil}, 2},
		{"total bound", []Option{WithMaxInFlight(1), WithMaxWaiting(2)},
			[]string{"a", "b", "c", "d"}, []error{nil, nil, nil, ErrFull}, 1},
		{"no waiting at all", []Option{WithMaxInFlight(1), WithMaxWaiting(0)},
			[]string{"a", "b"}, []error{nil, ErrFull}, 1},
		{"per-client bound", []Option{WithMaxInFlight(1), WithMaxWaitingPerClient(2)},
			[]string{"a", "a", "a", "a", "b"}, []error{nil, nil, nil, ErrClientFull, nil}, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := mustNew(t, tc.opts...)
			n := 0
			for i, k := range tc.enqueue {
				tk, err := q.Enqueue(k, nil)
				if !errors.Is(err, tc.wantErr[i]) || (tc.wantErr[i] == nil && err != nil) {
					t.Fatalf("enqueue %d (%s): err %v, want %v", i, k, err, tc.wantErr[i])
				}
				if err != nil {
					var be *BusyError
					if !errors.As(err, &be) || be.RetryAfter < DefaultRetryAfter || protocol.AsError(err).Code != protocol.CodeBusy {
						t.Errorf("refusal %v: want a *BusyError with a retry hint that maps to BUSY", err)
					}
					continue
				}
				if admitted(tk) {
					n++
				}
			}
			if n != tc.wantAdmit {
				t.Errorf("admitted %d, want %d", n, tc.wantAdmit)
			}
		})
	}
}

// TestRoundRobin: one client's burst of 200 does not put another client's
// single query behind it: the single one is the next but one admitted.
func TestRoundRobin(t *testing.T) {
	q := mustNew(t, WithMaxInFlight(1), WithMaxWaitingPerClient(500))
	var order []string
	var tickets []*Ticket
	for i := range 200 {
		tk, err := q.Enqueue("burst", nil)
		if err != nil {
			t.Fatal(err)
		}
		tickets = append(tickets, tk)
		_ = i
	}
	var pos Position
	single, err := q.Enqueue("single", func(p Position) { pos = p })
	if err != nil {
		t.Fatal(err)
	}
	if pos.Position != 2 || pos.Waiting != 200 {
		t.Errorf("single's first position %+v, want 2 of 200 waiting", pos)
	}
	all := append(tickets, single)
	names := map[*Ticket]string{single: "single"}
	for i, tk := range tickets {
		names[tk] = fmt.Sprintf("burst-%d", i)
	}
	for range len(all) {
		var run *Ticket
		for _, tk := range all {
			if tk.state == stateAdmitted {
				run = tk
			}
		}
		if run == nil {
			t.Fatal("nothing admitted")
		}
		order = append(order, names[run])
		run.Done()
	}
	if order[0] != "burst-0" || order[2] != "single" && order[1] != "single" {
		t.Errorf("admission order starts %v, want single among the first three", order[:4])
	}
	if s := q.Stats(); s.Waiting != 0 || s.Running != 0 || s.Clients != 0 {
		t.Errorf("after all: %+v", s)
	}
}

// TestPositions: under round robin a waiting query's position counts each
// other client's queries up to its own rank, and updates arrive as the
// queue moves.
func TestPositions(t *testing.T) {
	q := mustNew(t, WithMaxInFlight(1), WithUpdateInterval(10*time.Millisecond))
	run, _ := q.Enqueue("x", nil)
	var mu sync.Mutex
	last := map[string]int{}
	note := func(name string) func(Position) {
		return func(p Position) { mu.Lock(); last[name] = p.Position; mu.Unlock() }
	}
	tickets := map[string]*Ticket{}
	for _, e := range []struct{ name, key string }{{"a1", "a"}, {"a2", "a"}, {"a3", "a"}, {"b1", "b"}, {"c1", "c"}, {"c2", "c"}} {
		tk, err := q.Enqueue(e.key, note(e.name))
		if err != nil {
			t.Fatal(err)
		}
		tickets[e.name] = tk
	}
	// Round 1: a1 b1 c1; round 2: a2 c2; round 3: a3.
	want := map[string]int{"a1": 1, "b1": 2, "c1": 3, "a2": 4, "c2": 5, "a3": 6}
	q.update()
	mu.Lock()
	for k, v := range want {
		if last[k] != v {
			t.Errorf("%s at %d, want %d", k, last[k], v)
		}
	}
	mu.Unlock()
	run.Done() // admits a1
	deadline := time.Now().Add(waitLimit)
	for {
		mu.Lock()
		p := last["a3"]
		mu.Unlock()
		if p == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a3 still told position %d, want 5", p)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, tk := range tickets {
		tk.Done()
	}
}

func TestWaitEnds(t *testing.T) {
	tests := []struct {
		name     string
		maxWait  time.Duration
		ctx      func() (context.Context, context.CancelFunc)
		wantBusy bool
		want     error
	}{
		{"max wait passes: busy", 20 * time.Millisecond, func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }, true, ErrWaitExpired},
		{"deadline passes: busy", time.Minute, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 20*time.Millisecond)
		}, true, ErrWaitExpired},
		{"cancelled: not busy", time.Minute, func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(20*time.Millisecond, cancel)
			return ctx, cancel
		}, false, context.Canceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := mustNew(t, WithMaxInFlight(1), WithMaxWait(tc.maxWait))
			run, _ := q.Enqueue("a", nil)
			defer run.Done()
			w, err := q.Enqueue("b", nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := tc.ctx()
			defer cancel()
			err = w.Wait(ctx)
			w.Done()
			var be *BusyError
			if errors.As(err, &be) != tc.wantBusy || !errors.Is(err, tc.want) {
				t.Errorf("err %v, want busy=%v and %v", err, tc.wantBusy, tc.want)
			}
			if s := q.Stats(); s.Waiting != 0 || s.Clients != 0 {
				t.Errorf("left behind: %+v", s)
			}
		})
	}
}

func TestCapacityFollowsTheSwarm(t *testing.T) {
	var capacity atomic.Int64
	capacity.Store(1)
	q := mustNew(t, WithCapacity(func() int { return int(capacity.Load()) }))
	q.cfg.capacityEvery = time.Millisecond
	a, _ := q.Enqueue("a", nil)
	b, _ := q.Enqueue("b", nil)
	if !admitted(a) || admitted(b) {
		t.Fatalf("capacity 1: a %v b %v", admitted(a), admitted(b))
	}
	capacity.Store(3)
	time.Sleep(2 * time.Millisecond)
	c, _ := q.Enqueue("c", nil) // refreshes the limit, admits b, then c
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := b.Wait(ctx); err != nil || !admitted(c) {
		t.Errorf("capacity 3: b %v, c admitted %v", err, admitted(c))
	}
	capacity.Store(0)
	time.Sleep(2 * time.Millisecond)
	q.refreshLimit()
	if s := q.Stats(); s.Limit != 1 {
		t.Errorf("no capacity: limit %d, want at least 1", s.Limit)
	}
	for _, tk := range []*Ticket{a, b, c} {
		tk.Done()
	}
}

func TestCloseWakesWaiters(t *testing.T) {
	q := mustNew(t, WithMaxInFlight(1))
	run, _ := q.Enqueue("a", nil)
	defer run.Done()
	w, _ := q.Enqueue("b", nil)
	errc := make(chan error, 1)
	go func() { errc <- w.Wait(context.Background()) }()
	q.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("err %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("waiter not woken")
	}
	if _, err := q.Enqueue("c", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("enqueue after close: %v", err)
	}
}

// TestConcurrent: many clients at once never exceed the limit, and every
// query is admitted or refused.
func TestConcurrent(t *testing.T) {
	const limit = 4
	q := mustNew(t, WithMaxInFlight(limit), WithMaxWaiting(100), WithMaxWaitingPerClient(5))
	var running, peak atomic.Int64
	var ok, busy atomic.Int64
	var wg sync.WaitGroup
	for i := range 400 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk, err := q.Enqueue(fmt.Sprint(i%20), nil)
			if err != nil {
				busy.Add(1)
				return
			}
			defer tk.Done()
			if err := tk.Wait(context.Background()); err != nil {
				t.Error(err)
				return
			}
			n := running.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			time.Sleep(time.Millisecond)
			running.Add(-1)
			ok.Add(1)
		}()
	}
	wg.Wait()
	if peak.Load() > limit || ok.Load()+busy.Load() != 400 || ok.Load() < limit {
		t.Errorf("peak %d (limit %d), %d ok, %d busy", peak.Load(), limit, ok.Load(), busy.Load())
	}
	if s := q.Stats(); s.Waiting != 0 || s.Running != 0 || s.Clients != 0 {
		t.Errorf("after all: %+v", s)
	}
}
