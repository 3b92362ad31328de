package api_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/png"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
)

// serve runs the control API of n on a loopback port for the test.
func serve(t *testing.T, n *node.Node) *api.Client {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := api.NewServer(n, n.Router(), api.WithVersion("test-version"))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return api.NewClient(ln.Addr().String())
}

func TestAgainstRealSwarm(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(2))
	c := serve(t, s.Bootstrap)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	workers := map[string]bool{}
	for _, w := range s.Workers {
		workers[w.ID().String()] = true
	}

	t.Run("id", func(t *testing.T) {
		id, err := c.ID(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if id.Peer != s.Bootstrap.ID().String() || id.Swarm != s.Bootstrap.SwarmName() || id.Version != "test-version" {
			t.Fatalf("id = %+v", id)
		}
		if id.Join != s.Bootstrap.JoinLine() || len(id.Addrs) == 0 || !strings.HasSuffix(id.Addrs[0], "/p2p/"+id.Peer) {
			t.Fatalf("join or addrs wrong: %+v", id)
		}
		// The node's state: a bootstrap on loopback with two workers.
		if id.Roles == nil || id.Backends == nil || id.Reachability != "loopback only (this machine)" || id.ConnectedPeers < 2 {
			t.Fatalf("state wrong: %+v", id)
		}
		// Every connected peer has a connection at least.
		if id.Connections < id.ConnectedPeers {
			t.Errorf("%d connections for %d connected peers", id.Connections, id.ConnectedPeers)
		}
		// On loopback every connection is direct; none needed a hole punch.
		if p := id.Paths; p.Direct != id.ConnectedPeers || p.HolePunched != 0 || p.Relayed != 0 {
			t.Errorf("paths %+v, want all %d direct", p, id.ConnectedPeers)
		}
	})

	t.Run("peers and models", func(t *testing.T) {
		peers, err := c.Peers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		seen, self := 0, 0
		for _, p := range peers {
			if p.Self && p.Peer == s.Bootstrap.ID().String() {
				self++ // listed although it serves nothing
			}
			if workers[p.Peer] {
				seen++
				if len(p.Models) == 0 || p.Models[0].Name != "demo" {
					t.Errorf("worker %s listed with models %+v", p.Peer, p.Models)
				}
			}
		}
		if seen != len(workers) || self != 1 {
			t.Fatalf("peers lists %d of %d workers and %d self rows: %+v", seen, len(workers), self, peers)
		}
		models, err := c.Models(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(models) != 1 || models[0].Name != "demo" || models[0].Peers != 2 {
			t.Fatalf("models = %+v, want demo served by 2 peers", models)
		}
	})

	t.Run("chat streams", func(t *testing.T) {
		var kinds []string
		var text strings.Builder
		done, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Prompt: "hello control api"}, func(ev *api.Event) error {
			kinds = append(kinds, ev.Event)
			if ev.Event == api.EventChunk {
				text.WriteString(ev.Text)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !workers[done.Peer] || done.Local || done.Attempts < 1 || done.Model != "demo" {
			t.Fatalf("done = %+v", done)
		}
		if kinds[0] != api.EventAccepted || len(kinds) < 3 {
			t.Fatalf("events %v, want accepted then several chunks", kinds)
		}
		if !strings.HasPrefix(text.String(), "[demo answer from worker-") || !strings.HasSuffix(text.String(), "You said: hello control api") {
			t.Fatalf("text %q", text.String())
		}
		if done.Usage.CompletionTokens == 0 || done.TotalMs < done.TTFTMs {
			t.Fatalf("figures wrong: %+v", done)
		}
	})

	t.Run("imagine returns media", func(t *testing.T) {
		var media []*api.MediaEvent
		_, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Type: "imagine", Prompt: "a red square"}, func(ev *api.Event) error {
			if ev.Event == api.EventMedia {
				media = append(media, ev.MediaEvent)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(media) != 1 || media[0].MIME != "image/png" {
			t.Fatalf("media %+v", media)
		}
		if _, err := png.Decode(bytes.NewReader(media[0].Data)); err != nil {
			t.Fatalf("media is not a PNG: %v", err)
		}
	})

	t.Run("embed returns vectors", func(t *testing.T) {
		var idx []uint32
		_, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Type: "embed", Inputs: []string{"a", "b"}}, func(ev *api.Event) error {
			if ev.Event == api.EventEmbedding {
				if len(ev.Vector) == 0 {
					t.Errorf("empty vector")
				}
				idx = append(idx, ev.Index)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(idx) != 2 {
			t.Fatalf("got embeddings %v, want 2", idx)
		}
	})

	t.Run("unknown model", func(t *testing.T) {
		_, err := c.Query(ctx, &api.QueryRequest{Model: "no-such-model", Prompt: "hi"}, nil)
		var pe *protocol.Error
		if !errors.As(err, &pe) || pe.Code != protocol.CodeUnsupported || !strings.Contains(pe.Message, "no-such-model") {
			t.Fatalf("err = %v, want UNSUPPORTED naming the model", err)
		}
	})

	t.Run("bad request is a typed error", func(t *testing.T) {
		_, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Type: "vision", Prompt: "what is this"}, nil)
		var pe *protocol.Error
		if !errors.As(err, &pe) || pe.Code != protocol.CodeBadRequest {
			t.Fatalf("err = %v, want BAD_REQUEST (vision without an image)", err)
		}
	})

	t.Run("raw NDJSON", func(t *testing.T) {
		req, _ := http.NewRequestWithContext(ctx, "POST", "http://"+c.Addr()+"/v1/query",
			strings.NewReader(`{"model":"demo","prompt":"raw","timeout_ms":30000}`))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
			t.Fatalf("status %d, type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		var last map[string]any
		sc := bufio.NewScanner(resp.Body)
		lines := 0
		for sc.Scan() {
			lines++
			last = nil
			if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
				t.Fatalf("line %d is not JSON: %q", lines, sc.Text())
			}
		}
		for _, k := range []string{"peer", "local", "attempts", "usage", "ttft_ms", "total_ms", "queue_ms", "energy_mj", "worker_version", "model"} {
			if _, ok := last[k]; !ok {
				t.Errorf("done event %v lacks %q", last, k)
			}
		}
		if last["event"] != "done" {
			t.Fatalf("last event %v", last)
		}
	})
}

// A client that goes away cancels the query at the worker: with one token
// a second and a long prompt the answer would take minutes, yet the worker
// is idle again soon after the client stops reading.
func TestDisconnectCancelsAtWorker(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.DemoDelay(time.Second))
	c := serve(t, s.Bootstrap)
	w := s.Workers[0].Worker()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	stop := errors.New("enough")
	_, err := c.Query(ctx, &api.QueryRequest{Model: "demo", Prompt: strings.Repeat("word ", 300)}, func(ev *api.Event) error {
		if ev.Event == api.EventChunk {
			if running, _, _, _ := w.Load(); running != 1 {
				t.Errorf("worker runs %d queries while streaming, want 1", running)
			}
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) {
		t.Fatalf("err = %v, want the handler's error", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		running, queued, _, _ := w.Load()
		if running == 0 && queued == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker still runs %d queries 30 s after the client left", running)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
