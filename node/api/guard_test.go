package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// These requests are all refused before the node or the router is asked
// anything, so the server is built without them.
func TestRefusedBeforeRouting(t *testing.T) {
	big := `{"model":"demo","prompt":"` + strings.Repeat("x", 2048) + `"}`
	cases := []struct {
		name     string
		method   string
		path     string
		body     string
		remote   string
		host     string
		header   map[string]string
		allow    bool
		maxBody  int64
		wantCode int
		wantErr  string
	}{
		{name: "remote client", method: "GET", path: "/v1/id", remote: "192.0.2.7:4444", wantCode: 403, wantErr: "FORBIDDEN"},
		{name: "remote client v6", method: "GET", path: "/v1/peers", remote: "[2001:db8::1]:4444", wantCode: 403, wantErr: "FORBIDDEN"},
		{name: "rebinding host", method: "GET", path: "/v1/id", host: "evil.example:5050", wantCode: 403, wantErr: "FORBIDDEN"},
		{name: "browser origin", method: "GET", path: "/v1/peers", header: map[string]string{"Origin": "http://evil.example"}, wantCode: 403, wantErr: "FORBIDDEN"},
		{name: "browser origin allowed remote", method: "GET", path: "/v1/peers", allow: true, remote: "192.0.2.7:1", header: map[string]string{"Origin": "null"}, wantCode: 403, wantErr: "FORBIDDEN"},
		// A page that rebound its name to a node whose API is bound off
		// loopback: same-origin, no Origin, but Sec-Fetch-Site.
		{name: "rebound page allowed remote", method: "GET", path: "/v1/id", allow: true, remote: "192.0.2.7:1", host: "evil.example:5050", header: map[string]string{"Sec-Fetch-Site": "same-origin"}, wantCode: 403, wantErr: "FORBIDDEN"},
		{name: "unknown endpoint", method: "GET", path: "/v2/nothing", wantCode: 404, wantErr: "NOT_FOUND"},
		{name: "wrong method", method: "DELETE", path: "/v1/query", wantCode: 404, wantErr: "NOT_FOUND"},
		{name: "not json", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi"}`, header: map[string]string{"Content-Type": "text/plain"}, wantCode: 415, wantErr: "BAD_REQUEST"},
		{name: "bad json", method: "POST", path: "/v1/query", body: `{"model":`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "unknown field", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","temperature":1}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "wrong field type", method: "POST", path: "/v1/query", body: `{"model":7,"prompt":"hi"}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "trailing data", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi"} {}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "too large", method: "POST", path: "/v1/query", body: big, maxBody: 1024, wantCode: 413, wantErr: "TOO_LARGE"},
		{name: "no model", method: "POST", path: "/v1/query", body: `{"prompt":"hi"}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "unknown type", method: "POST", path: "/v1/query", body: `{"model":"demo","type":"dance","prompt":"hi"}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "empty chat", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"  "}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "negative timeout", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","timeout_ms":-1}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "huge timeout", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","timeout_ms":99999999999}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "overflowing timeout", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","timeout_ms":9223372036854775807}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "bad params", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","params":{"temperature":5}}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "bad role", method: "POST", path: "/v1/query", body: `{"model":"demo","messages":[{"role":"god","content":"hi"}]}`, wantCode: 400, wantErr: "BAD_REQUEST"},
		{name: "bad prefer", method: "POST", path: "/v1/query", body: `{"model":"demo","prompt":"hi","prefer":"cheap"}`, wantCode: 400, wantErr: "BAD_REQUEST"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := []Option{WithAllowRemote(tc.allow)}
			if tc.maxBody > 0 {
				opts = append(opts, WithMaxBody(tc.maxBody))
			}
			h := NewServer(nil, nil, opts...).Handler()
			req := httptest.NewRequest(tc.method, "http://127.0.0.1:5050"+tc.path, strings.NewReader(tc.body))
			req.RemoteAddr = "127.0.0.1:40000"
			if tc.remote != "" {
				req.RemoteAddr = tc.remote
			}
			if tc.host != "" {
				req.Host = tc.host
			}
			if tc.method == "POST" {
				req.Header.Set("Content-Type", "application/json")
			}
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != tc.wantCode {
				t.Fatalf("status %d, want %d; body %s", rec.Code, tc.wantCode, rec.Body)
			}
			if tc.wantErr == "" {
				return
			}
			var body ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("error body is not JSON: %v: %s", err, rec.Body)
			}
			if body.Error.Code != tc.wantErr || body.Error.Message == "" {
				t.Fatalf("error %+v, want code %s and a message", body.Error, tc.wantErr)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
		})
	}
}

func TestErrorEventRoundTrip(t *testing.T) {
	for _, code := range []string{"BAD_REQUEST", "UNSUPPORTED", "BUSY", "TOO_LARGE", "BACKEND_ERROR", "TIMEOUT", "CANCELLED", "INTERNAL"} {
		e := &ErrorEvent{Code: code, Message: "m", Retryable: true}
		pe := e.ProtoError()
		if got := errorEvent(pe); *got != *e {
			t.Errorf("%s: round trip gave %+v", code, got)
		}
	}
	if pe := (&ErrorEvent{Code: "NOPE", Message: "m"}).ProtoError(); pe.Code != 8 {
		t.Errorf("unknown code became %v, want INTERNAL", pe.Code)
	}
}

// The event union must encode each kind with its own fields only, and
// decode back to the same kind.
func TestEventJSON(t *testing.T) {
	cases := []struct {
		ev   Event
		want string
	}{
		{Event{Event: EventAccepted, AcceptedEvent: &AcceptedEvent{}}, `{"event":"accepted","queue_position":0}`},
		{Event{Event: EventChunk, ChunkEvent: &ChunkEvent{Text: "hi"}}, `{"event":"chunk","text":"hi"}`},
		{Event{Event: EventMedia, MediaEvent: &MediaEvent{MIME: "image/png", Data: []byte{1, 2}}}, `{"event":"media","mime":"image/png","data":"AQI="}`},
		{Event{Event: EventEmbedding, EmbeddingEvent: &EmbeddingEvent{Index: 1, Vector: []float32{0.5}}}, `{"event":"embedding","index":1,"vector":[0.5]}`},
		{Event{Event: EventError, ErrorEvent: &ErrorEvent{Code: "BUSY", Message: "full", Retryable: true}}, `{"event":"error","code":"BUSY","message":"full","retryable":true}`},
	}
	for _, tc := range cases {
		b, err := json.Marshal(tc.ev)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tc.want {
			t.Errorf("got %s, want %s", b, tc.want)
		}
		var back Event
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		b2, _ := json.Marshal(back)
		if string(b2) != tc.want {
			t.Errorf("round trip gave %s, want %s", b2, tc.want)
		}
	}
	d := Event{Event: EventDone, DoneEvent: &DoneEvent{Peer: "p", Attempts: 1}}
	b, _ := json.Marshal(d)
	for _, field := range []string{`"peer":"p"`, `"ttft_ms":0`, `"total_ms":0`, `"usage":{"prompt_tokens":0,"completion_tokens":0}`, `"energy_mj":0`} {
		if !strings.Contains(string(b), field) {
			t.Errorf("done event %s lacks %s", b, field)
		}
	}
	if strings.Contains(string(b), `"text"`) || strings.Contains(string(b), `"code"`) {
		t.Errorf("done event %s carries fields of other kinds", b)
	}
}

func TestClientUnreachable(t *testing.T) {
	// A listener closed at once: nothing answers on its port.
	srv := httptest.NewServer(http.NotFoundHandler())
	addr := srv.Listener.Addr().String()
	srv.Close()
	_, err := NewClient(addr).Peers(t.Context())
	if err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("err = %v, want an unreachable error naming %s", err, addr)
	}
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v does not wrap ErrUnreachable", err)
	}
}
