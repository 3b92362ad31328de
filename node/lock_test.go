package node

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/discovery"
)

func TestDataDirIsLocked(t *testing.T) {
	dir := t.TempDir()
	opts := []Option{WithDataDir(dir), WithListenAddrs("/ip4/127.0.0.1/tcp/0"), WithMDNS(false)}
	first, err := New(context.Background(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(context.Background(), opts...); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second node on one data dir: err = %v, want 'in use'", err)
	}
	first.Close()
	again, err := New(context.Background(), opts...)
	if err != nil {
		t.Fatalf("data dir still locked after Close: %v", err)
	}
	if again.ID() != first.ID() {
		t.Fatal("identity not reused")
	}
	again.Close()
}

// A New that fails after its host started leaves nothing behind: the
// data dir is unlocked and the listen port free for the next try.
func TestFailedStartReleasesAll(t *testing.T) {
	dir := t.TempDir()
	port := freeTCPPort(t)
	opts := []Option{WithDataDir(dir), WithListenAddrs(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", port)), WithMDNS(false)}
	bad := append(slices.Clone(opts), WithDiscoveryOptions(discovery.WithSweepInterval(0)))
	if _, err := New(context.Background(), bad...); err == nil || !strings.Contains(err.Error(), "start discovery") {
		t.Fatalf("err = %v, want a failed discovery start", err)
	}
	n, err := New(context.Background(), opts...)
	if err != nil {
		t.Fatalf("a start after the failed one: %v", err)
	}
	n.Close()
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
