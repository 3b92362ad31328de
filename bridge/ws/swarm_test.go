package ws_test

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// TestSeedClientAgainstRealSwarm speaks the seed client's messages to a
// bridge whose Swarm is the router of a node without backends: every query
// crosses a libp2p stream to one of two demo workers on loopback.
func TestSeedClientAgainstRealSwarm(t *testing.T) {
	var running, cancelled atomic.Int64
	sw := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1),
		swarmtest.Backends(func(_ int, label string) []backend.Backend {
			return []backend.Backend{wstest.Observed{Backend: demo.New(label, demo.WithDelay(20*time.Millisecond)), Running: &running, Stopped: &cancelled}}
		}))
	r := sw.Clients[0].Router()
	workers := map[string]bool{}
	for _, w := range sw.Workers {
		workers[w.ID().String()] = true
	}
	deadline := time.Now().Add(waitLimit)
	for len(r.Peers()) < 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	h := newHarnessOn(t, r)
	c := h.mustDial()
	_, _, wu := c.hello()

	t.Run("worker_update without addresses", func(t *testing.T) {
		var names []string
		for _, w := range wu["workers"].([]any) {
			e := w.(map[string]any)
			names = append(names, e["name"].(string)+"="+e["type"].(string))
			if e["address"] != "swarm" || e["peers"] != float64(2) {
				t.Errorf("entry %v", e)
			}
		}
		if !slices.Contains(names, "demo=chat") || !slices.Contains(names, "demo [vision]=vision") {
			t.Errorf("workers %v", names)
		}
		var all []string
		allStrings(map[string]any(wu), &all)
		for _, s := range all {
			if multiaddrRe.MatchString(s) || hostPortRe.MatchString(s) {
				t.Errorf("worker_update carries something like a network address: %q", s)
			}
		}
	})

	t.Run("submit_query", func(t *testing.T) {
		c.send(submit("hello over libp2p", "chat", "demo"))
		res, _ := c.until("query_result")
		if !strings.Contains(res.str("result"), "You said: hello over libp2p") {
			t.Errorf("result %q", res.str("result"))
		}
		done, _ := c.until("query_done")
		if !workers[done.str("peer")] || done["local"] != false {
			t.Errorf("answered by %v (local %v), want one of the workers over the network", done.str("peer"), done["local"])
		}
	})

	t.Run("speech", func(t *testing.T) {
		c.send(msg{"type": "submit_query", "query": msg{"prompt": "", "query_type": "speech", "model_type": "worker_node",
			"model_name": "demo", "audio": base64.StdEncoding.EncodeToString(webm)}})
		tr, _ := c.until("query_transcript")
		res, _ := c.until("query_result")
		if !strings.Contains(tr.str("text"), fmt.Sprintf("%d bytes of audio received", len(webm))) ||
			!strings.Contains(res.str("result"), "You said: "+tr.str("text")) {
			t.Errorf("transcript %q, answer %q", tr.str("text"), res.str("result"))
		}
	})

	t.Run("vision chunks", func(t *testing.T) {
		b64 := base64.StdEncoding.EncodeToString(testPNG(t, 32, 32))
		parts := chunks(b64, len(b64)/3)
		for i, p := range parts {
			c.send(visionChunk(i, len(parts), p, "img-1", "what is this?"))
		}
		c.until("vision_upload_complete")
		res, _ := c.until("query_result")
		if !strings.Contains(res.str("result"), "received 1 image(s) and the question: what is this?") {
			t.Errorf("vision answer %q", res.str("result"))
		}
	})

	t.Run("cancel reaches the worker", func(t *testing.T) {
		before := cancelled.Load()
		c.send(msg{"type": "submit_query", "query_id": "long", "query": msg{"prompt": strings.Repeat("word ", 500), "query_type": "chat", "model_name": "demo"}})
		c.until("query_chunk")
		c.send(msg{"type": "cancel", "query_id": "long"})
		if e, _ := c.until("error"); e.str("code") != "CANCELLED" || e.str("query_id") != "long" {
			t.Errorf("error %v", e)
		}
		deadline := time.Now().Add(waitLimit)
		for (cancelled.Load() == before || running.Load() != 0) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if cancelled.Load() != before+1 || running.Load() != 0 {
			t.Errorf("worker backends: %d cancelled (want %d), %d running", cancelled.Load(), before+1, running.Load())
		}
	})
}

// TestEmptySwarm: with no worker in the swarm the seed client gets an
// empty worker list and every query a typed error, never a hang.
func TestEmptySwarm(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(0), swarmtest.Clients(1))
	c := newHarnessOn(t, sw.Clients[0].Router()).mustDial()
	_, _, wu := c.hello()
	if w, _ := wu["workers"].([]any); len(w) != 0 {
		t.Errorf("workers = %v, want none", w)
	}
	tests := []msg{
		submit("anyone there?", "chat", "demo"),
		submit("a cat", "imagine", ""),
		{"type": "speech_to_text", "audio": base64.StdEncoding.EncodeToString(webm)},
	}
	for _, m := range tests {
		c.send(m)
		e, before := c.until("error")
		if e.str("code") != "UNSUPPORTED" || !strings.Contains(e.str("message"), "no model in the swarm serves") {
			t.Errorf("%v: error %v", m, e)
		}
		if len(before) != 0 {
			t.Errorf("%v: got %v before the error", m, types(before))
		}
	}
}
