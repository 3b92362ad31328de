package main

import (
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestE2ESlowStreamsThroughTwoNodes: a bridge process and a worker
// process (its openai backend in front of the bench's HTTP backend, 16
// tokens 50 ms apart) carry 500 concurrent streamed chat queries from one
// bridge, one libp2p peer to the worker: every answer arrives whole.
// Before the per-peer stream limits followed the worker's admission and
// the router paced its stream opens, the worker reset the streams past
// about 220.
func TestE2ESlowStreamsThroughTwoNodes(t *testing.T) {
	needBinary(t)
	const streams = 500
	be, err := pathbench.StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = be.Close() })
	dir := t.TempDir()
	slots := strconv.Itoa(streams)
	w := startNode(t, "worker", nodeArgs(filepath.Join(dir, "worker"),
		"--backend", "openai="+be.URL(), "--max-concurrency", slots, "--max-queue", slots)...)
	br := startNode(t, "bridge", nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--join", w.value("join"),
		"--bridge", "127.0.0.1:0", "--bridge-queue", slots, "--bridge-queue-per-client", slots)...)
	waitWorkers(t, br.value("api"), pathbench.SlowModel, w.value("peer"))
	base := strings.TrimSuffix(br.value("bridge"), "/")

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	one := pathbench.NewClient(base, pathbench.SlowModel, 1)
	defer one.Close()
	single := one.Run(ctx, 5, 1)
	cl := pathbench.NewClient(base, pathbench.SlowModel, streams)
	defer cl.Close()
	r := cl.Run(ctx, streams, streams)
	t.Logf("%d slow streams at once through bridge → worker: %d errors, TTFT p50 %s p99 %s (one stream: p99 %s), total p99 %s",
		streams, r.Errors, r.TTFTP50, r.TTFTP99, single.TTFTP99, r.P99)
	if single.Errors != 0 {
		t.Fatalf("one stream at a time: %d errors (%s)", single.Errors, single.FirstError)
	}
	if r.Errors != 0 {
		t.Fatalf("%d of %d slow streams failed; first: %s", r.Errors, streams, r.FirstError)
	}
}
