package worker

import (
	"sync"
	"testing"
	"time"
)

// TestGoPool: every function runs; a function given while a kept
// goroutine is idle runs on it; no more than max are kept, the rest run
// on goroutines of their own; kept goroutines end after their idle time.
func TestGoPool(t *testing.T) {
	p := newGoPool(2, 200*time.Millisecond)
	var wg sync.WaitGroup
	run := func(f func()) {
		wg.Add(1)
		p.Go(func() { defer wg.Done(); f() })
	}

	run(func() {})
	wg.Wait()
	if n := len(p.kept); n != 1 {
		t.Fatalf("after one function: %d goroutines kept, want 1", n)
	}
	// The idle kept goroutine takes the next one: still one kept.
	waitIdle(t, p)
	run(func() {})
	wg.Wait()
	if n := len(p.kept); n != 1 {
		t.Fatalf("after a second function: %d goroutines kept, want 1 (reused)", n)
	}

	// Five at once with room for two: all run, two are kept.
	release := make(chan struct{})
	var ran sync.WaitGroup
	ran.Add(5)
	for range 5 {
		run(func() { ran.Done(); <-release })
	}
	ran.Wait() // all five run at once: none waited for a kept goroutine
	if n := len(p.kept); n != 2 {
		t.Fatalf("five at once: %d goroutines kept, want 2", n)
	}
	close(release)
	wg.Wait()

	// Idle past their time, the kept goroutines end.
	deadline := time.Now().Add(5 * time.Second)
	for len(p.kept) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines still kept after their idle time", len(p.kept))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitIdle waits until a kept goroutine waits for work: one send then
// finds it (the pool's channel is unbuffered).
func waitIdle(t *testing.T, p *goPool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		done := make(chan struct{})
		select {
		case p.work <- func() { close(done) }:
			<-done
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no kept goroutine became idle")
		}
		time.Sleep(time.Millisecond)
	}
}

// deep uses about n KiB of stack, as a query's handler does through the
// resource manager and the HTTP client's pool.
//
//go:noinline
func deep(n int) byte {
	var buf [1000]byte
	if n <= 1 {
		return buf[0]
	}
	buf[n%len(buf)] = byte(n)
	return deep(n-1) + buf[0]
}

// BenchmarkStreamGoroutines compares a fresh goroutine per stream (the
// baseline, libp2p's handler goroutine) with the kept ones of goPool,
// for a function that needs 16 KiB of stack: the ratio of their ns/op is
// the cost of growing the stack each time.
func BenchmarkStreamGoroutines(b *testing.B) {
	for _, bc := range []struct {
		name string
		run  func(*goPool, func())
	}{
		{"go", func(_ *goPool, f func()) { go f() }},
		{"pool", func(p *goPool, f func()) { p.Go(f) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			p := newGoPool(keptGoroutines, keptIdle)
			var wg sync.WaitGroup
			sem := make(chan struct{}, 64) // 64 streams at once
			for b.Loop() {
				sem <- struct{}{}
				wg.Add(1)
				bc.run(p, func() {
					defer wg.Done()
					deep(16)
					<-sem
				})
			}
			wg.Wait()
		})
	}
}
