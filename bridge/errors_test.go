package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestFromProtocol(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
	}{
		{protocol.Errorf(protocol.CodeBadRequest, "x"), 400, "bad_request"},
		{protocol.Errorf(protocol.CodeTooLarge, "x"), 413, "request_too_large"},
		{protocol.Errorf(protocol.CodeBusy, "x"), 429, "swarm_busy"},
		{protocol.Errorf(protocol.CodeUnsupported, "x"), 503, "no_capable_peer"},
		{protocol.Errorf(protocol.CodeTimeout, "x"), 504, "timeout"},
		{protocol.Errorf(protocol.CodeCancelled, "x"), 499, "cancelled"},
		{protocol.Errorf(protocol.CodeBackendError, "x"), 502, "backend_error"},
		{protocol.Errorf(protocol.CodeInternal, "x"), 500, "internal_error"},
		{context.DeadlineExceeded, 504, "timeout"},
		{fmt.Errorf("wrapped: %w", protocol.Errorf(protocol.CodeBusy, "x")), 429, "swarm_busy"},
		{fmt.Errorf("plain"), 500, "internal_error"},
	}
	for _, tc := range tests {
		t.Run(tc.code, func(t *testing.T) {
			e := fromProtocol(tc.err, 3*time.Second)
			if e.Status != tc.status || e.Code != tc.code {
				t.Errorf("%v -> %d %s, want %d %s", tc.err, e.Status, e.Code, tc.status, tc.code)
			}
			if (e.Status == 429) != (e.RetryAfter == 3*time.Second) {
				t.Errorf("retry-after %s on %d", e.RetryAfter, e.Status)
			}
		})
	}
}

// TestFromProtocolScrubsAddresses: a worker's error reaches an API client
// without the addresses it quotes (package scrub has the forms).
func TestFromProtocolScrubsAddresses(t *testing.T) {
	for _, code := range []pb.ErrorCode{protocol.CodeBackendError, protocol.CodeBusy, protocol.CodeUnsupported, protocol.CodeInternal} {
		e := fromProtocol(protocol.Errorf(code, "ollama http://127.0.0.1:11434 down; dial /ip4/10.0.0.7/tcp/4001 and [::1]:4001 failed"), 0)
		for _, leak := range []string{"127.0.0.1", "11434", "/ip4/", "10.0.0.7", "[::1]"} {
			if strings.Contains(e.Message, leak) {
				t.Errorf("%v: %q leaked in %q", code, leak, e.Message)
			}
		}
	}
}

func TestWriteErrorShape(t *testing.T) {
	rec := httptest.NewRecorder()
	writeError(rec, &apiError{Status: 429, Type: typeRateLimit, Code: "swarm_busy", Message: "busy", RetryAfter: 1500 * time.Millisecond})
	if rec.Code != 429 || rec.Header().Get("Retry-After") != "2" || rec.Header().Get("Retry-After-Ms") != "1500" {
		t.Errorf("status %d headers %v", rec.Code, rec.Header())
	}
	assertErrorShape(t, rec.Body.Bytes(), "swarm_busy")
	rec = httptest.NewRecorder()
	writeError(rec, badRequest("", "", "x"))
	var raw map[string]map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &raw); err != nil {
		t.Fatal(err)
	}
	if v, ok := raw["error"]["param"]; !ok || v != nil {
		t.Errorf("param should be null, got %v", raw)
	}
	if v, ok := raw["error"]["code"]; !ok || v != nil {
		t.Errorf("code should be null, got %v", raw)
	}
}

// assertErrorShape checks OpenAI's error object: exactly message, type,
// param and code under "error", with the given code.
func assertErrorShape(t *testing.T, body []byte, code string) map[string]any {
	t.Helper()
	var raw map[string]map[string]any
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatalf("error body is not JSON: %v: %s", err, body)
	}
	e, ok := raw["error"]
	if !ok || len(raw) != 1 {
		t.Fatalf("error body %s: want one key \"error\"", body)
	}
	for _, k := range []string{"message", "type", "param", "code"} {
		if _, ok := e[k]; !ok {
			t.Errorf("error body %s lacks %q", body, k)
		}
	}
	if len(e) != 4 {
		t.Errorf("error body %s has extra keys", body)
	}
	if m, _ := e["message"].(string); m == "" {
		t.Errorf("error body %s has no message", body)
	}
	if code != "" && e["code"] != code {
		t.Errorf("error code %v, want %q (body %s)", e["code"], code, body)
	}
	return e
}

// TestValidationErrorsNameTheirParameter: a request the protocol's rules
// refuse gets invalid_value and, where the rule is about one parameter,
// its name in param, as OpenAI's errors have it.
func TestValidationErrorsNameTheirParameter(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	for _, tc := range []struct{ name, path, body, param string }{
		{"image size", "/v1/images/generations", `{"model":"demo","prompt":"a cat","size":"big"}`, "size"},
		{"image output_format", "/v1/images/generations", `{"model":"demo","prompt":"a cat","output_format":"` + strings.Repeat("f", 40) + `"}`, "output_format"},
		{"tool_choice naming no tool", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a"}}],"tool_choice":{"type":"function","function":{"name":"b"}}}`, "tool_choice"},
		{"no content", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":null}]}`, "messages"},
		{"frequency_penalty out of range", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"frequency_penalty":5}`, "frequency_penalty"},
		{"presence_penalty out of range", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"presence_penalty":-3}`, "presence_penalty"},
		{"top_logprobs over the limit", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":50}`, "top_logprobs"},
		{"tool name", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"no spaces allowed"}}]}`, "tools"},
		{"json_schema name", "/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"no spaces","schema":{}}}}`, "response_format"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := postJSON(t, base+tc.path, tc.body, nil)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d: %s", resp.StatusCode, b)
			}
			e := assertErrorShape(t, b, "invalid_value")
			if e["param"] != tc.param {
				t.Fatalf("param %v, want %q: %s", e["param"], tc.param, b)
			}
		})
	}
}

// TestRequestParam: the protocol's field names become OpenAI's request
// parameters, which differ by endpoint for some.
func TestRequestParam(t *testing.T) {
	for _, tc := range []struct {
		field string
		t     pb.QueryType
		want  string
	}{
		{"messages", pb.QueryType_QUERY_TYPE_CHAT, "messages"},
		{"max_tokens", pb.QueryType_QUERY_TYPE_CHAT, "max_tokens"},
		{"inputs", pb.QueryType_QUERY_TYPE_EMBED, "input"},
		{"prompt", pb.QueryType_QUERY_TYPE_IMAGINE, "prompt"},
		{"prompt", pb.QueryType_QUERY_TYPE_TTS, "input"},
		{"format", pb.QueryType_QUERY_TYPE_TTS, "response_format"},
		{"format", pb.QueryType_QUERY_TYPE_IMAGINE, "output_format"},
		{"priority", pb.QueryType_QUERY_TYPE_CHAT, ""},
		{"", pb.QueryType_QUERY_TYPE_CHAT, ""},
	} {
		if got := requestParam(tc.field, tc.t); got != tc.want {
			t.Errorf("requestParam(%q, %s) = %q, want %q", tc.field, tc.t, got, tc.want)
		}
	}
}
