package main

import (
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
)

// A join peer that restarts (a bootstrap keeping the swarm view, as a
// bridge does) lists its workers again within seconds, although they kept
// other peers meanwhile, on TCP and on QUIC (where a killed peer's
// connection ends without a reset). A build without the join loop's
// redial passes too, later (TCP: 11.9 s against 0.5 s; QUIC: 0.5 s both,
// by another path); TestLostJoinPeerIsDialledAgain (node) isolates the
// redial, which a large swarm relies on.
func TestE2ERestartedJoinPeerSeesItsWorkersAgain(t *testing.T) {
	needBinary(t)
	for _, tr := range []string{"tcp", "quic"} {
		t.Run(tr, func(t *testing.T) { testRestartedJoinPeer(t, tr) })
	}
}

func testRestartedJoinPeer(t *testing.T, transport string) {
	dir := t.TempDir()
	// The bootstrap comes back at the same address, with the same key.
	listen, anyAddr := "/ip4/127.0.0.1/tcp/"+strconv.Itoa(freePort(t, "tcp")), "/ip4/127.0.0.1/tcp/0"
	if transport == "quic" {
		listen, anyAddr = "/ip4/127.0.0.1/udp/"+strconv.Itoa(freePort(t, "udp"))+"/quic-v1", "/ip4/127.0.0.1/udp/0/quic-v1"
	}
	args := func(name, listen string, extra ...string) []string {
		return append([]string{"--data-dir", filepath.Join(dir, name), "--api", "127.0.0.1:0", "--no-mdns", "--listen", listen}, extra...)
	}
	boot := startNode(t, "bootstrap", args("bootstrap", listen, "--no-detect")...)
	// A second node that helps peers find each other: with it the
	// workers' DHT keeps a peer while the bootstrap is down, so it does
	// not dial its bootstrap peers itself (it does once its routing
	// table is empty), and only the join loop brings the workers back.
	helper := startNode(t, "helper", args("helper", anyAddr, "--no-detect", "--join", boot.value("join"))...)
	w1 := startNode(t, "worker 1", args("w1", anyAddr, "--backend", "demo", "--join", boot.value("join"))...)
	// The second worker also joins through the first: the two stay
	// connected while the bootstrap is down, so neither is ever alone.
	w2 := startNode(t, "worker 2", args("w2", anyAddr, "--backend", "demo", "--join", boot.value("join"), "--join", w1.value("join"))...)
	workers := []string{w1.value("peer"), w2.value("peer")}
	waitWorkers(t, boot.value("api"), "demo", workers...)
	waitWorkers(t, helper.value("api"), "demo", workers...)

	if _, err := boot.signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	again := startNode(t, "bootstrap again", args("bootstrap", listen, "--no-detect")...)
	if again.value("peer") != boot.value("peer") {
		t.Fatal("the restarted bootstrap has another peer ID")
	}
	started := time.Now()
	c := api.NewClient(again.value("api"))
	const bound = 30 * time.Second
	for {
		peers, err := c.Peers(t.Context())
		if err == nil && listsWorkers(peers, "demo", workers...) {
			t.Logf("%s: both workers listed by the restarted bootstrap %s after it started", transport, time.Since(started).Round(time.Millisecond))
			return
		}
		if time.Since(started) > bound {
			t.Fatalf("%s: the restarted bootstrap does not list both workers %s after it started (last: %+v, %v)", transport, bound, peers, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
