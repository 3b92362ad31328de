package bridge

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// refusingBackend accepts the query, then its backend refuses it, as a
// model server does for a prompt over its context length.
type refusingBackend struct{ Swarm }

func (r refusingBackend) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	if err := h(&pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{}}}); err != nil {
		return nil, err
	}
	return nil, protocol.Errorf(protocol.CodeBadRequest, "context length exceeded")
}

// A streamed request the backend refuses before any token gets its real
// HTTP status and error body, not a 200 stream with an error event.
func TestStreamRefusedBeforeOutputGetsItsStatus(t *testing.T) {
	sw := refusingBackend{newLocalSwarm(t)}
	_, base := startBridge(t, sw)
	resp, body := postJSON(t, base+"/v1/chat/completions",
		`{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}`, nil)
	if resp.StatusCode != 400 {
		t.Fatalf("status %d, body %s: want 400", resp.StatusCode, body)
	}
}

// slowStart is a swarm whose worker takes a while to the first token.
type slowStart struct{ Swarm }

func (s slowStart) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	select {
	case <-time.After(400 * time.Millisecond):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.Swarm.Query(ctx, req, h)
}

// A stream that waits for its first token sends SSE comments meanwhile, so
// a proxy's read timeout does not cut it; clients ignore comments.
func TestStreamKeepAliveWhileWaiting(t *testing.T) {
	_, base := startBridge(t, slowStart{newLocalSwarm(t)}, WithKeepAlive(100*time.Millisecond))
	resp, body := postJSON(t, base+"/v1/chat/completions",
		`{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}`, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), ": keep-alive\n\n") || !strings.HasSuffix(string(body), "data: [DONE]\n\n") {
		t.Fatalf("status %d body %q: want keep-alive comments, then the answer", resp.StatusCode, body)
	}
}
