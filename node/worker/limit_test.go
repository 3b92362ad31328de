package worker

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"

	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestRefusalAtResourceLimitIsBusy: a worker whose resource manager will
// not give a query stream its memory refuses the query as busy: the
// client reads BUSY, or a reset with libp2p's resource-limit code, which
// routers count as busy (docs/protocol.md), never a plain reset, which
// they count as a dead worker.
func TestRefusalAtResourceLimitIsBusy(t *testing.T) {
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) { testRefusalAtResourceLimitIsBusy(t, tr.listen) })
	}
}

func testRefusalAtResourceLimitIsBusy(t *testing.T, listen string) {
	limits := rcmgr.PartialLimitConfig{Stream: rcmgr.ResourceLimits{Memory: 16 << 10}}.Build(rcmgr.DefaultLimits.AutoScale())
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits))
	if err != nil {
		t.Fatal(err)
	}
	wh := hostOn(t, listen, libp2p.ResourceManager(rm))
	w := newWorker(t, demo.New("w"))
	wh.SetStreamHandler("/mtor/test/query", w.HandleStream)
	ch := loopbackHost(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ch.Connect(ctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
		t.Fatal(err)
	}
	// Several tries: the BUSY frame and the reset race, and each outcome
	// must be a busy one. The reset can even come while the client is
	// still negotiating the protocol (when it does so eagerly), so the
	// open itself may carry it; the router reads it there too.
	for i := range 10 {
		s, err := ch.NewStream(ctx, wh.ID(), "/mtor/test/query")
		if protocol.RefusedAtLimit(err) {
			continue
		}
		if err != nil {
			t.Fatalf("try %d: open: %v, want a stream or a reset with code %#x", i, err, network.StreamResourceLimitExceeded)
		}
		if err := protocol.WriteFrame(s, req("hello")); err != nil && !protocol.RefusedAtLimit(err) {
			t.Fatalf("try %d: write: %v", i, err)
		}
		var ev pb.Event
		err = protocol.NewFrameReader(s, protocol.MaxEventFrame).Read(&ev)
		switch {
		case err == nil && ev.GetError().GetCode() == pb.ErrorCode_ERROR_CODE_BUSY:
		case protocol.RefusedAtLimit(err):
		default:
			t.Fatalf("try %d: read %v (event %v), want BUSY or a reset with code %#x", i, err, &ev, network.StreamResourceLimitExceeded)
		}
		_ = s.Reset()
	}
}
