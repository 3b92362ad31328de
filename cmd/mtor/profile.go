package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"time"
)

// startCPUProfile profiles the node's CPU into PREFIX.PID until the
// returned stop (the node's end): MTOR_CPUPROFILE=PREFIX, a hook for
// profiling the processes `mtor bench` starts (docs/benchmarks.md). With
// after > 0 (MTOR_CPUPROFILE_AFTER) the profile starts that long after,
// so that it holds an idle node's steady state, not its start; a node
// that stops sooner leaves no file.
func startCPUProfile(prefix string, after time.Duration) (stop func(), err error) {
	f, err := createProfile("MTOR_CPUPROFILE", prefix)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	started, stopped := false, false
	begin := func() error {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return nil
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("MTOR_CPUPROFILE: %w", err)
		}
		started = true
		return nil
	}
	var t *time.Timer
	if after > 0 {
		t = time.AfterFunc(after, func() { _ = begin() })
	} else if err := begin(); err != nil {
		f.Close()
		_ = os.Remove(f.Name())
		return nil, err
	}
	return func() {
		if t != nil {
			t.Stop()
		}
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		if started {
			pprof.StopCPUProfile()
		}
		_ = f.Close()
		if !started {
			_ = os.Remove(f.Name())
		}
	}, nil
}

// writeHeapProfile writes the node's live heap, after a collection, to
// PREFIX.PID when a stop signal arrives, before the node lets anything go:
// MTOR_MEMPROFILE=PREFIX, for finding what an idle node holds per
// connection (docs/benchmarks.md).
func writeHeapProfile(prefix string) error {
	f, err := createProfile("MTOR_MEMPROFILE", prefix)
	if err != nil {
		return err
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		return fmt.Errorf("MTOR_MEMPROFILE: %w", err)
	}
	return nil
}

// createProfile creates PREFIX.PID for the profile that variable asks for.
func createProfile(variable, prefix string) (*os.File, error) {
	f, err := os.Create(prefix + "." + strconv.Itoa(os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", variable, err)
	}
	return f, nil
}
