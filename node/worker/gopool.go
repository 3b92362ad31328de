package worker

import "time"

// goPool runs functions on goroutines that outlive them. A query's stream
// handler grows its stack through libp2p's resource manager and the HTTP
// client's connection pool; a fresh goroutine per stream copied its stack
// at each doubling (runtime.newstack: 7–8 % of a worker's CPU at 64
// queries at once, profiled). A goroutine kept for the next stream has
// its stack grown already.
type goPool struct {
	work chan func() // unbuffered: a send succeeds only to an idle goroutine
	kept chan struct{}
	idle time.Duration
}

// A query stream uses two goroutines (its handler and the reset watch);
// the kept ones cover 64 queries at once and end after a few idle
// seconds, so an idle worker keeps none.
const (
	keptGoroutines = 128
	keptIdle       = 5 * time.Second
)

// newGoPool keeps at most max goroutines, each for idle after its last
// function.
func newGoPool(max int, idle time.Duration) *goPool {
	return &goPool{work: make(chan func()), kept: make(chan struct{}, max), idle: idle}
}

// Go runs f on an idle kept goroutine, else on a new one (kept if fewer
// than max are). It never waits.
func (p *goPool) Go(f func()) {
	select {
	case p.work <- f:
		return
	default:
	}
	select {
	case p.kept <- struct{}{}:
		go p.loop(f)
	default:
		go f()
	}
}

func (p *goPool) loop(f func()) {
	defer func() { <-p.kept }()
	t := time.NewTimer(p.idle)
	defer t.Stop()
	for {
		f()
		t.Reset(p.idle)
		select {
		case f = <-p.work:
		case <-t.C:
			return
		}
	}
}
