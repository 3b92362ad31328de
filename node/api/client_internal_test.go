package api

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
)

// TestQueryAgainstASilentNode: a node that takes the connection and never
// answers (stopped with SIGSTOP: the kernel still accepts) ends the query
// at its deadline and the slack, as TIMEOUT, instead of holding the client
// for good.
func TestQueryAgainstASilentNode(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // held open, never answered
		}
	}()
	c := NewClient(ln.Addr().String())
	c.slack = 200 * time.Millisecond
	done := make(chan error, 1)
	go func() {
		_, err := c.Query(context.Background(), &QueryRequest{Model: "demo", Prompt: "hi", TimeoutMs: 300}, nil)
		done <- err
	}()
	select {
	case err := <-done:
		if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeTimeout {
			t.Fatalf("err %v, want TIMEOUT", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the query still waits on a node that says nothing")
	}
}
