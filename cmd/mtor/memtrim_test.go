package main

import (
	"context"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// TestTrimWhenIdle: the idle trim runs in a process that allocates
// little and has spare heap, and never in one that allocates as a busy
// node does.
func TestTrimWhenIdle(t *testing.T) {
	for _, tc := range []struct {
		name string
		busy bool
	}{
		{"idle", false},
		{"busy", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Spare heap: 16 MiB allocated and dropped (a MiB is past
			// what the compiler keeps on the stack).
			for range 16 {
				runtime.KeepAlive(make([]byte, 1<<20))
			}
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			var trims atomic.Int32
			done := make(chan struct{})
			go func() {
				defer close(done)
				trimWhenIdle(ctx, 50*time.Millisecond, 4<<20, func() { trims.Add(1) })
			}()
			for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); {
				if tc.busy {
					// 1 MiB a millisecond: a period's allocations are far past
					// the idle bound.
					runtime.KeepAlive(make([]byte, 1<<20))
				}
				time.Sleep(time.Millisecond)
			}
			cancel()
			<-done
			switch n := trims.Load(); {
			case tc.busy && n > 0:
				t.Fatalf("trimmed %d times while busy, want never", n)
			case !tc.busy && n == 0:
				t.Fatal("never trimmed while idle with spare heap")
			}
		})
	}
}
