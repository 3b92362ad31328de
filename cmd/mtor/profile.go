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
	f, err := createProfile("MTOR_CPUPROFILE", prefix)
	if err != nil {
		return nil, err
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
