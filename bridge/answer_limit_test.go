package bridge

import (
	"net/http"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestAnswerLimit: a non-streamed answer longer than WithMaxAnswer is cut
// off and named as what it is, a 502 response_too_large saying how large
// an answer may be (not a 413, which would blame the request); the same
// answer streamed is not gathered and passes whole.
func TestAnswerLimit(t *testing.T) {
	const limit = 1000
	var events []*pb.Event
	for range 30 { // 3000 bytes of answer
		events = append(events, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: strings.Repeat("x", 100)}}})
	}
	fs := &fakeSwarm{events: events}
	_, base := startBridge(t, fs, WithMaxAnswer(limit))

	t.Run("chat", func(t *testing.T) {
		resp, b := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`, nil)
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("%d %s, want 502", resp.StatusCode, b)
		}
		e := assertErrorShape(t, b, "response_too_large")
		if msg, _ := e["message"].(string); !strings.Contains(msg, "1000 bytes") || e["type"] != "server_error" {
			t.Errorf("error %v: want a server_error naming the 1000-byte limit", e)
		}
	})
	t.Run("transcription", func(t *testing.T) {
		ct, body := transcriptionBody(t, map[string]string{"model": "demo"}, "a.wav", []byte("RIFF\x00\x00\x00\x00WAVEfmt "))
		resp, b := call(t, http.MethodPost, base+"/v1/audio/transcriptions", ct, body, nil)
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("%d %s, want 502", resp.StatusCode, b)
		}
		assertErrorShape(t, b, "response_too_large")
	})
	t.Run("streamed chat is not bounded", func(t *testing.T) {
		resp, b := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}`, nil)
		if resp.StatusCode != http.StatusOK || strings.Count(string(b), strings.Repeat("x", 100)) != 30 || !strings.HasSuffix(string(b), "data: [DONE]\n\n") {
			t.Fatalf("%d %s, want the whole answer streamed", resp.StatusCode, b)
		}
	})
}

// TestAnswerLimitCountsLogprobs: log probabilities count toward the
// non-streamed answer's bound by the JSON they make, not by their few
// bytes on the wire: a worker's chunk of valid but large entries (a
// 256-byte token, 20 alternatives each) is cut off as response_too_large,
// not turned into a response many times the bound.
func TestAnswerLimitCountsLogprobs(t *testing.T) {
	const limit = 100 << 10
	big := func() *pb.TokenLogprob {
		lp := &pb.TokenLogprob{Token: strings.Repeat("\x01", 256), Logprob: -1, Bytes: make([]byte, 256)}
		for range 20 {
			lp.Top = append(lp.Top, &pb.TopLogprob{Token: strings.Repeat("\x01", 256), Logprob: -2, Bytes: make([]byte, 256)})
		}
		return lp
	}
	var lps []*pb.TokenLogprob
	for range 50 {
		lps = append(lps, big())
	}
	fs := &fakeSwarm{events: []*pb.Event{{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "x", Logprobs: lps}}}},
		models: []routerModel{{Name: "demo", Types: []string{"chat"}, Features: []string{protocol.FeatureLogprobs}, Peers: 1}}}
	_, base := startBridge(t, fs, WithMaxAnswer(limit))
	resp, b := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","logprobs":true,"top_logprobs":20,"messages":[{"role":"user","content":"hi"}]}`, nil)
	if resp.StatusCode != http.StatusBadGateway || len(b) > limit {
		t.Fatalf("%d, %d bytes (%.200s): want a 502 response_too_large", resp.StatusCode, len(b), b)
	}
	assertErrorShape(t, b, "response_too_large")
}

// TestOllamaStreamedToolCallsBounded: tool calls, which the Ollama API
// sends whole at the end of a stream, are gathered within WithMaxAnswer;
// past it the client reads a 502 before the stream starts, or an error
// line after its text, never a stream that just stops.
func TestOllamaStreamedToolCallsBounded(t *testing.T) {
	call := func(args string) *pb.Event {
		return &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Id: "c1", Name: "f", Arguments: args}}}
	}
	models := []routerModel{{Name: "demo", Types: []string{"chat"}, Features: []string{protocol.FeatureTools}, Peers: 1}}
	body := `{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}`
	for _, tc := range []struct {
		name   string
		events []*pbEvent
		status int
	}{
		{"before any text", []*pbEvent{call(strings.Repeat("a", 200)), call(strings.Repeat("b", 200))}, http.StatusBadGateway},
		{"after text", []*pbEvent{chunk("some text"), call(strings.Repeat("a", 200)), call(strings.Repeat("b", 200))}, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, base := startBridge(t, &fakeSwarm{events: tc.events, models: models}, WithMaxAnswer(300))
			resp, b := postJSON(t, base+"/api/chat", body, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d (%s), want %d", resp.StatusCode, b, tc.status)
			}
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if last := lines[len(lines)-1]; !strings.Contains(last, `"error"`) || !strings.Contains(last, "300 bytes") {
				t.Fatalf("last line %q: want an error naming the 300-byte bound", last)
			}
		})
	}
}
