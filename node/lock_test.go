package node

import (
	"context"
	"strings"
	"testing"
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
