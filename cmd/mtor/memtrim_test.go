package main

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"
)

// TestTrimWhenIdle: the idle trim runs in a process that allocates
// little and has spare heap, and never in one that allocates as a busy
// node does or has nothing to give back. The runtime's readings are
// scripted: the real ones depend on what else the test binary runs.
func TestTrimWhenIdle(t *testing.T) {
	const idle = 4 << 20
	for _, tc := range []struct {
		name        string
		allocStep   uint64 // allocated between two readings
		spare       uint64
		wantTrimmed bool
	}{
		{"idle with spare heap", 64 << 10, 16 << 20, true},
		{"busy", 8 << 20, 16 << 20, false},
		{"idle without spare heap", 64 << 10, trimMinFree - 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var allocs uint64
			read := func() (uint64, uint64) {
				mu.Lock()
				defer mu.Unlock()
				allocs += tc.allocStep
				return allocs, tc.spare
			}
			ctx, cancel := context.WithCancel(t.Context())
			trimmed := make(chan struct{}, 1)
			done := make(chan struct{})
			go func() {
				defer close(done)
				trimWhenIdle(ctx, time.Millisecond, idle, read, func() {
					select {
					case trimmed <- struct{}{}:
					default:
					}
				})
			}()
			var got bool
			select {
			case <-trimmed:
				got = true
			case <-time.After(200 * time.Millisecond): // 200 periods
			}
			cancel()
			<-done
			if got != tc.wantTrimmed {
				t.Fatalf("trimmed = %v, want %v", got, tc.wantTrimmed)
			}
		})
	}
}

// TestMemSamplerCountsAllocations: the runtime's figures the trim reads
// count what the process allocates.
func TestMemSamplerCountsAllocations(t *testing.T) {
	m := newMemSampler()
	before, _ := m.read()
	for range 4 {
		runtime.KeepAlive(make([]byte, 1<<20))
	}
	after, _ := m.read()
	if after-before < 4<<20 {
		t.Fatalf("4 MiB allocated, the sampler counted %d bytes", after-before)
	}
}
