package bridge

import (
	"context"
	"testing"

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
