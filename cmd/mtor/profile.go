package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
)

// startCPUProfile profiles the node's CPU into PREFIX.PID until the
// returned stop (the node's end): MTOR_CPUPROFILE=PREFIX, a hook for
// profiling the processes `mtor bench` starts (docs/benchmarks.md).
func startCPUProfile(prefix string) (stop func(), err error) {
	f, err := os.Create(prefix + "." + strconv.Itoa(os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("MTOR_CPUPROFILE: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("MTOR_CPUPROFILE: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
	}, nil
}

// writeHeapProfile writes the node's live heap, after a collection, to
// PREFIX.PID when a stop signal arrives, before the node lets anything go:
// MTOR_MEMPROFILE=PREFIX, for finding what an idle node holds per
// connection (docs/benchmarks.md).
func writeHeapProfile(prefix string) error {
	f, err := os.Create(prefix + "." + strconv.Itoa(os.Getpid()))
	if err != nil {
		return fmt.Errorf("MTOR_MEMPROFILE: %w", err)
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		return fmt.Errorf("MTOR_MEMPROFILE: %w", err)
	}
	return nil
}
