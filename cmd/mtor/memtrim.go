package main

import (
	"context"
	"runtime/metrics"
	"time"
)

// Idle memory trim: the Go runtime keeps a heap up to its goal (twice
// the live heap, 4 MiB at least) resident and hands freed pages back
// only slowly, so an idle node sits at its last peak. The node is a
// process of its own, so the trim belongs to the process, not to the
// node package: a test or simulator running many nodes in one process
// keeps the runtime's defaults.
const (
	trimPeriod = 30 * time.Second
	// trimIdleAlloc is what a process may allocate in a period and still
	// be idle: gossip heartbeats and DHT upkeep, not queries (a query
	// allocates tens of KiB, a busy node MiBs a second).
	trimIdleAlloc = 4 << 20
	// trimMinFree is the least spare heap worth a collection.
	trimMinFree = 1 << 20
)

// memSampler reads the runtime's cumulative allocations and the heap a
// collection and a scavenge would give back: the free heap not yet
// returned, and the objects beyond those the last collection kept.
type memSampler struct{ s []metrics.Sample }

func newMemSampler() *memSampler {
	return &memSampler{s: []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/gc/heap/live:bytes"},
	}}
}

func (m *memSampler) read() (allocs, spare uint64) {
	metrics.Read(m.s)
	var v [4]uint64
	for i, s := range m.s {
		if s.Value.Kind() == metrics.KindUint64 {
			v[i] = s.Value.Uint64()
		}
	}
	spare = v[1]
	if v[2] > v[3] {
		spare += v[2] - v[3]
	}
	return v[0], spare
}

// trimWhenIdle calls trim (debug.FreeOSMemory: a collection, then the
// free heap back to the OS) once a period while the process allocates
// less than idle bytes a period and has spare heap, until ctx ends. A busy
// process is left alone: the collection it would force costs CPU there,
// and its heap is in use anyway. read says the cumulative allocations and
// the spare heap (newMemSampler().read).
func trimWhenIdle(ctx context.Context, period time.Duration, idle uint64, read func() (allocs, spare uint64), trim func()) {
	last, _ := read()
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		allocs, spare := read()
		busy := allocs-last >= idle
		last = allocs
		if busy || spare < trimMinFree {
			continue
		}
		trim()
		last, _ = read()
	}
}
