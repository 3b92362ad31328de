package bridge

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// fakeVisionServer is a FAKE OpenAI-compatible vision model server (no
// model runs here): it serves "llava" and answers with the order in which
// the last message's content parts reached it, "text <text>" or "image
// <media type>" per part, joined by " | ", streamed a part at a time. It
// records the requests' last messages.
type fakeVisionServer struct {
	mu   sync.Mutex
	last []any
}

func (f *fakeVisionServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/models" {
		io.WriteString(w, `{"object":"list","data":[{"id":"llava","object":"model"}]}`)
		return
	}
	var body struct {
		Messages []map[string]any `json:"messages"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil || len(body.Messages) == 0 {
		http.Error(w, `{"error":{"message":"bad request"}}`, 400)
		return
	}
	content := body.Messages[len(body.Messages)-1]["content"]
	f.mu.Lock()
	f.last = append(f.last, content)
	f.mu.Unlock()
	var order []string
	switch c := content.(type) {
	case string:
		order = append(order, "text "+c)
	case []any:
		for _, p := range c {
			p, _ := p.(map[string]any)
			switch p["type"] {
			case "text":
				order = append(order, fmt.Sprint("text ", p["text"]))
			case "image_url":
				url, _ := p["image_url"].(map[string]any)["url"].(string)
				mime, _, _ := strings.Cut(strings.TrimPrefix(url, "data:"), ";")
				order = append(order, "image "+mime)
			default:
				order = append(order, fmt.Sprint("unknown ", p["type"]))
			}
		}
	}
	w.Header().Set("Content-Type", "text/event-stream")
	for i, o := range order {
		if i > 0 {
			o = " | " + o
		}
		b, _ := json.Marshal(map[string]any{"id": "x", "object": "chat.completion.chunk",
			"choices": []any{map[string]any{"index": 0, "delta": map[string]any{"content": o}, "finish_reason": nil}}})
		fmt.Fprintf(w, "data: %s\n\n", b)
	}
	io.WriteString(w, `data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`+"\n\ndata: [DONE]\n\n")
}

// TestOpenAIClientImagesKeepTheirPlace: the official openai npm client
// sends messages whose images stand among text parts (before, between and
// after them) through a bridge on a client node of a real swarm, to a
// worker whose openai backend fronts the fake vision server. The model
// server receives the parts in the order the client sent them, the text
// parts whole (the joiner the swarm's request puts between them left out).
// Before Attachment.at it got the text parts joined, then every image.
// On TCP and QUIC.
func TestOpenAIClientImagesKeepTheirPlace(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []swarmtest.Option
	}{{"tcp", nil}, {"quic", []swarmtest.Option{swarmtest.QUIC()}}} {
		t.Run(tc.name, func(t *testing.T) { testImagesKeepTheirPlace(t, tc.opts...) })
	}
}

func testImagesKeepTheirPlace(t *testing.T, opts ...swarmtest.Option) {
	fake := &fakeVisionServer{}
	url := serveFake(t, fake)
	sw := swarmtest.New(t, append([]swarmtest.Option{swarmtest.Workers(1), swarmtest.Clients(1),
		swarmtest.Backends(func(int, string) []backend.Backend {
			b, err := openai.New(url)
			if err != nil {
				t.Fatal(err)
			}
			return []backend.Backend{b}
		})}, opts...)...)
	r := sw.Clients[0].Router()
	for deadline := time.Now().Add(testTimeout); len(r.Models()) < 1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("client sees models %v", r.Models())
		}
	}
	_, base := startBridge(t, r)
	checks := nodeScript(t, "openai_vision.mjs", nil, base+"/v1")
	for _, want := range []string{"between", "first", "usual"} {
		if _, ok := checks[want]; !ok {
			t.Errorf("openai_vision.mjs did not report check %q", want)
		}
	}
	fake.mu.Lock()
	defer fake.mu.Unlock()
	if len(fake.last) != 6 {
		t.Fatalf("the model server got %d requests, want 6 (3 cases, whole and streamed)", len(fake.last))
	}
	// The first case's parts, as the model server got them.
	js, _ := json.Marshal(fake.last[0])
	want := `[{"text":"Left:","type":"text"},{"image_url":{"url":"data:image/png;base64,`
	if !strings.HasPrefix(string(js), want) {
		t.Errorf("first request's content %s, want it to begin %s", js, want)
	}
}
