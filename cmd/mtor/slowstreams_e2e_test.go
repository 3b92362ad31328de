package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestE2ESlowStreamsThroughTwoNodes: bridge processes and a worker
// process (its openai backend in front of the bench's HTTP backend, 16
// tokens 50 ms apart) carry hundreds of concurrent streamed chat queries;
// every answer arrives whole. Before the per-peer stream limits followed
// the worker's admission and the router paced its stream opens, the
// worker reset the streams past about 220. With several bridges bursting
// at once, each is its own libp2p peer to the worker, and over QUIC each
// bridge's 300 streams exceed the 256 a QUIC connection allows at once.
func TestE2ESlowStreamsThroughTwoNodes(t *testing.T) {
	needBinary(t)
	tcp, quic := transports()[0], transports()[1]
	for _, tc := range []struct {
		name      string
		tr        transport
		bridges   int
		perBridge int
	}{
		{"one bridge/tcp", tcp, 1, 500},
		{"three bridges at once/quic", quic, 3, 300},
	} {
		t.Run(tc.name, func(t *testing.T) { slowStreams(t, tc.tr, tc.bridges, tc.perBridge) })
	}
}

func slowStreams(t *testing.T, tr transport, bridges, perBridge int) {
	be, err := pathbench.StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = be.Close() })
	dir := t.TempDir()
	total := strconv.Itoa(bridges * perBridge)
	w := startNode(t, "worker", tr.nodeArgs(filepath.Join(dir, "worker"),
		"--backend", "openai="+be.URL(), "--max-concurrency", total, "--max-queue", total)...)
	slots := strconv.Itoa(perBridge)
	var bases []string
	for i := range bridges {
		name := fmt.Sprintf("bridge%d", i)
		br := startNode(t, name, tr.nodeArgs(filepath.Join(dir, name), "--no-detect", "--join", w.value("join"),
			"--bridge", "127.0.0.1:0", "--bridge-queue", slots, "--bridge-queue-per-client", slots)...)
		waitWorkers(t, br.value("api"), pathbench.SlowModel, w.value("peer"))
		bases = append(bases, strings.TrimSuffix(br.value("bridge"), "/"))
	}

	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	one := pathbench.NewClient(bases[0], pathbench.SlowModel, 1)
	defer one.Close()
	single := one.Run(ctx, 5, 1)
	if single.Errors != 0 {
		t.Fatalf("one stream at a time: %d errors (%s)", single.Errors, single.FirstError)
	}

	// Every bridge's clients start together.
	results := make([]pathbench.Result, bridges)
	var wg sync.WaitGroup
	for i, base := range bases {
		cl := pathbench.NewClient(base, pathbench.SlowModel, perBridge)
		defer cl.Close()
		wg.Go(func() { results[i] = cl.Run(ctx, perBridge, perBridge) })
	}
	wg.Wait()
	for i, r := range results {
		t.Logf("bridge %d of %d: %d slow streams at once → one worker: %d errors, TTFT p50 %s p99 %s (one stream: p99 %s), total p99 %s",
			i+1, bridges, perBridge, r.Errors, r.TTFTP50, r.TTFTP99, single.TTFTP99, r.P99)
		if r.Errors != 0 {
			t.Errorf("bridge %d: %d of %d slow streams failed; first: %s", i+1, r.Errors, perBridge, r.FirstError)
		}
	}
}
