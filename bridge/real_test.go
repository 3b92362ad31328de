package bridge

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestThroughRealSwarm: the bridge on a client node of real swarm answers
// from the worker across libp2p, names it, and shows it without addresses.
func TestThroughRealSwarm(t *testing.T) {
	r, _, workerID := newRealSwarm(t)
	_, base := startBridge(t, r)

	resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"across the swarm"}]}`, nil)
	var out chatCompletion
	if err := json.Unmarshal(body, &out); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if !strings.Contains(out.Choices[0].Message.Content, "You said: across the swarm") {
		t.Errorf("answer %q", out.Choices[0].Message.Content)
	}
	if resp.Header.Get("X-Mtor-Peer") != workerID.String() || out.Mtor.Peer != workerID.String() || out.Mtor.Local {
		t.Errorf("peer header %q, mtor %+v, want remote worker %s", resp.Header.Get("X-Mtor-Peer"), out.Mtor, workerID)
	}

	resp, body = postJSON(t, base+"/v1/chat/completions", `{"model":"demo","stream":true,"messages":[{"role":"user","content":"stream across"}]}`, nil)
	events := sseEvents(t, strings.NewReader(string(body)))
	if resp.StatusCode != 200 || len(events) < 3 || events[len(events)-1] != "[DONE]" || resp.Trailer.Get("X-Mtor-Peer") != workerID.String() {
		t.Errorf("stream: %d, %d events, trailer %q", resp.StatusCode, len(events), resp.Trailer.Get("X-Mtor-Peer"))
	}

	resp, body = postJSON(t, base+"/v1/chat/completions", `{"model":"none","messages":[{"role":"user","content":"x"}]}`, nil)
	if resp.StatusCode != 404 {
		t.Errorf("unknown model: %d %s", resp.StatusCode, body)
	}

	resp, body = call(t, "GET", base+"/api/swarm", "", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), workerID.String()) {
		t.Fatalf("swarm view %d %s", resp.StatusCode, body)
	}
	for _, leak := range []string{"/ip4/", "/ip6/", "127.0.0.1", "/tcp/"} {
		if strings.Contains(string(body), leak) {
			t.Errorf("swarm view shows an address (%q): %s", leak, body)
		}
	}
}
