package bridge

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
)

// fakeToolServer is a FAKE OpenAI-compatible model server (no model behind
// it): it answers the way a tool-calling server does, so that tool calls
// reach the bridge from a backend that really produced them on the wire.
// Given tools and a question, it streams a call of the first tool in
// fragments (finish_reason tool_calls); given the tool's answer, it
// streams text quoting it; given a json_schema response_format, it
// streams a JSON object. It records every request body.
type fakeToolServer struct {
	mu     sync.Mutex
	bodies []map[string]any
}

func (f *fakeToolServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/models" {
		io.WriteString(w, `{"object":"list","data":[{"id":"toolbox","object":"model"}]}`)
		return
	}
	var body map[string]any
	raw, _ := io.ReadAll(r.Body)
	if err := json.Unmarshal(raw, &body); err != nil {
		http.Error(w, `{"error":{"message":"bad json"}}`, 400)
		return
	}
	f.mu.Lock()
	f.bodies = append(f.bodies, body)
	f.mu.Unlock()
	msgs, _ := body["messages"].([]any)
	last, _ := msgs[len(msgs)-1].(map[string]any)
	w.Header().Set("Content-Type", "text/event-stream")
	send := func(delta map[string]any, finish any) {
		b, _ := json.Marshal(map[string]any{"id": "x", "object": "chat.completion.chunk",
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}})
		fmt.Fprintf(w, "data: %s\n\n", b)
	}
	rf, _ := body["response_format"].(map[string]any)
	tools, _ := body["tools"].([]any)
	switch {
	case rf != nil && rf["type"] == "json_schema":
		for _, p := range []string{`{"city":`, `"Oslo",`, `"sunny":true}`} {
			send(map[string]any{"content": p}, nil)
		}
		send(map[string]any{}, "stop")
	case len(tools) > 0 && last["role"] == "user":
		name := tools[0].(map[string]any)["function"].(map[string]any)["name"]
		call := func(fn map[string]any, extra map[string]any) map[string]any {
			c := map[string]any{"index": 0, "function": fn}
			for k, v := range extra {
				c[k] = v
			}
			return map[string]any{"tool_calls": []any{c}}
		}
		send(call(map[string]any{"name": name, "arguments": ""}, map[string]any{"id": "call_fake_1", "type": "function"}), nil)
		send(call(map[string]any{"arguments": `{"city":`}, nil), nil)
		send(call(map[string]any{"arguments": `"Oslo"}`}, nil), nil)
		send(map[string]any{}, "tool_calls")
	case last["role"] == "tool":
		send(map[string]any{"content": "The tool says: "}, nil)
		send(map[string]any{"content": fmt.Sprint(last["content"])}, nil)
		send(map[string]any{}, "stop")
	default:
		send(map[string]any{"content": "plain answer"}, nil)
		send(map[string]any{}, "stop")
	}
	io.WriteString(w, "data: [DONE]\n\n")
}

func (f *fakeToolServer) requests() []map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...)
}

// serveFake serves h on a loopback port for the test.
func serveFake(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// TestOpenAIClientTools runs the official openai npm client through a
// bridge on a client node of a real swarm: one worker has the openai
// backend in front of the fake tool server ("toolbox", features tools and
// json_schema), another the demo backend ("demo", no tools). Tool calls
// cross libp2p as ToolCallDelta events.
func TestOpenAIClientTools(t *testing.T) {
	fake := &fakeToolServer{}
	url := serveFake(t, fake)
	sw := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, label string) []backend.Backend {
			if i == 1 {
				return []backend.Backend{demo.New(label, demo.WithDelay(time.Millisecond))}
			}
			b, err := openai.New(url, openai.WithFeatures(protocol.FeatureTools, protocol.FeatureJSONSchema))
			if err != nil {
				t.Fatal(err)
			}
			return []backend.Backend{b}
		}))
	runClient(t, sw, "openai_tools.mjs", "/v1", "tools", "tools_stream", "json_schema", "unsupported")
	// The worker's backend got the tools, and the tool message with the
	// id of the call the fake made.
	var sawAnswer bool
	for _, b := range fake.requests() {
		msgs, _ := b["messages"].([]any)
		for _, m := range msgs {
			mm := m.(map[string]any)
			if mm["role"] == "tool" && mm["tool_call_id"] == "call_fake_1" && strings.Contains(fmt.Sprint(mm["content"]), "sunny") {
				sawAnswer = true
			}
		}
	}
	if !sawAnswer {
		t.Errorf("the model server never got the tool's answer: %v", fake.requests())
	}
}

// TestOllamaClient runs the official ollama npm client (ollama-js) against
// the bridge's Ollama API, on the same swarm as TestOpenAIClientTools:
// list, show, ps, streamed chat, generate, embed, and a tool round trip
// whose call comes from the fake tool server behind the openai backend.
func TestOllamaClient(t *testing.T) {
	fake := &fakeToolServer{}
	url := serveFake(t, fake)
	sw := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, label string) []backend.Backend {
			if i == 1 {
				return []backend.Backend{demo.New(label, demo.WithDelay(time.Millisecond))}
			}
			b, err := openai.New(url, openai.WithFeatures(protocol.FeatureTools))
			if err != nil {
				t.Fatal(err)
			}
			return []backend.Backend{b}
		}))
	runClient(t, sw, "ollama_client.mjs", "", "list", "chat", "embed", "tools")
}

// runClient waits until the swarm's client node sees both workers' models,
// runs script against a bridge on it (at path under the bridge's root) and
// checks that the script reported every check in want.
func runClient(t *testing.T, sw *swarmtest.Swarm, script, path string, want ...string) {
	t.Helper()
	r := sw.Clients[0].Router()
	deadline := time.Now().Add(testTimeout)
	for len(r.Models()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("client sees models %v", r.Models())
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, base := startBridge(t, r)
	checks := nodeScript(t, script, nil, base+path)
	for _, w := range want {
		if _, ok := checks[w]; !ok {
			t.Errorf("%s did not report check %q", script, w)
		}
	}
}
