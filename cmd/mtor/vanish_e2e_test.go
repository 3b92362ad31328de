package main

import (
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// TestE2EVanishedQUICWorkerLeavesTheView: a worker process killed
// (SIGKILL) or frozen (SIGSTOP) on QUIC sends nothing: no reset, no FIN,
// and its connection to the bridge stays open until QUIC's idle timeout
// (30 s). The bridge's failed pings hand that connection to the liveness
// probe, which closes it, and the worker leaves the bridge's view long
// before: within a ping interval, the ping's timeout and a probe (15 + 5
// + 2 s at worst). The worker announces every 20 s, so its announcement
// lives 60 s and cannot expire first. Before the pings were wired to the
// probe, it stayed 30 s.
func TestE2EVanishedQUICWorkerLeavesTheView(t *testing.T) {
	needBinary(t)
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
	}{{"sigkill", syscall.SIGKILL}, {"sigstop", syscall.SIGSTOP}} {
		sig := tc.sig
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			args := func(name string, extra ...string) []string {
				return append([]string{"--data-dir", filepath.Join(dir, name), "--api", "127.0.0.1:0", "--no-mdns",
					"--listen", "/ip4/127.0.0.1/udp/0/quic-v1"}, extra...)
			}
			bridge := startNode(t, "bridge", args("bridge", "--no-detect")...)
			worker := startNode(t, "worker", args("worker", "--backend", "demo", "--announce-interval", "20s", "--join", bridge.value("join"))...)
			waitWorkers(t, bridge.value("api"), "demo", worker.value("peer"))

			if err := worker.cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			if sig == syscall.SIGSTOP {
				t.Cleanup(func() { _ = worker.cmd.Process.Signal(syscall.SIGCONT) })
			}
			vanished := time.Now()
			c := api.NewClient(bridge.value("api"))
			// QUIC's idle timeout would take the connection, and the
			// worker with it, at 30 s.
			const bound = 28 * time.Second
			for {
				peers, err := c.Peers(t.Context())
				if err == nil && !slices.ContainsFunc(peers, func(p api.Peer) bool { return p.Peer == worker.value("peer") }) {
					t.Logf("%s: the worker left the bridge's view %s after it vanished", tc.name, time.Since(vanished).Round(time.Millisecond))
					return
				}
				if time.Since(vanished) > bound {
					t.Fatalf("%s: the worker is still in the bridge's view %s after it vanished", tc.name, bound)
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}
