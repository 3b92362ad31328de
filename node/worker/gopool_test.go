package worker

import (
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// onKept reports whether the calling function runs on a kept goroutine
// of a goPool (its stack goes through the pool's loop).
func onKept() bool {
	buf := make([]byte, 8<<10)
	return strings.Contains(string(buf[:runtime.Stack(buf, false)]), "(*goPool).loop")
}

// TestGoPool: a function given while a kept goroutine is idle runs on
// it; no more than max are kept and the rest run at once on goroutines of
// their own; kept goroutines end after their idle time.
func TestGoPool(t *testing.T) {
	// run gives f to p and waits for it: whether it ran on a kept goroutine.
	run := func(p *goPool) bool {
		kept := make(chan bool)
		p.Go(func() { kept <- onKept() })
		return <-kept
	}

	t.Run("reuses an idle goroutine", func(t *testing.T) {
		p := newGoPool(1, time.Minute)
		if !run(p) {
			t.Fatal("the first function did not run on a kept goroutine")
		}
		// The kept goroutine is idle within moments; until it waits for
		// work, functions run on goroutines of their own. With one kept
		// and a minute's idle time, a function on a kept goroutine is on
		// that same one.
		deadline := time.Now().Add(5 * time.Second)
		for !run(p) {
			if time.Now().After(deadline) {
				t.Fatal("no later function ran on the kept goroutine")
			}
			time.Sleep(time.Millisecond)
		}
		if n := len(p.kept); n != 1 {
			t.Fatalf("%d goroutines kept, want 1", n)
		}
	})

	t.Run("bounded, never waits, idle ones end", func(t *testing.T) {
		p := newGoPool(2, 200*time.Millisecond)
		release := make(chan struct{})
		var ran, done sync.WaitGroup
		var mu sync.Mutex
		onKeptN := 0
		for range 5 {
			ran.Add(1)
			done.Add(1)
			p.Go(func() {
				defer done.Done()
				k := onKept()
				mu.Lock()
				if k {
					onKeptN++
				}
				mu.Unlock()
				ran.Done()
				<-release
			})
		}
		ran.Wait() // all five run at once: none waited for a kept goroutine
		if n := len(p.kept); n != 2 || onKeptN != 2 {
			t.Fatalf("five at once with room for two: %d kept, %d ran on kept goroutines; want 2 and 2", n, onKeptN)
		}
		close(release)
		done.Wait()
		deadline := time.Now().Add(5 * time.Second)
		for len(p.kept) > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%d goroutines still kept after their idle time", len(p.kept))
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
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
