package bridge

import (
	"context"
	"testing"

	"github.com/mtor-swarm/mtor/node/backend/detect"
)

// A node's backend auto-detection must not mistake a bridge (which serves
// /v1/models) for an OpenAI-compatible model server.
func TestDetectionSkipsABridge(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	resp, _ := call(t, "GET", base+"/v1/models", "", nil, nil)
	if got := resp.Header.Get("Server"); got != "mtor" {
		t.Fatalf("Server header = %q, want mtor", got)
	}
	found := detect.Detect(context.Background(), detect.WithCandidates(detect.Candidate{Kind: detect.KindOpenAI, URL: base}))
	if len(found) != 0 {
		t.Fatalf("detection took the bridge for a model server: %v", found)
	}
}
