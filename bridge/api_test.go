package bridge

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var client = &http.Client{Timeout: testTimeout}

// call sends a request and returns the response with its body read.
func call(t *testing.T, method, url, contentType string, body []byte, header map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	return resp, b
}

func postJSON(t *testing.T, url, body string, header map[string]string) (*http.Response, []byte) {
	t.Helper()
	return call(t, http.MethodPost, url, "application/json", []byte(body), header)
}

// transcriptionBody builds a multipart upload.
func transcriptionBody(t *testing.T, fields map[string]string, filename string, audio []byte) (string, []byte) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for k, v := range fields {
		if err := mw.WriteField(k, v); err != nil {
			t.Fatal(err)
		}
	}
	if audio != nil {
		h := textproto.MIMEHeader{}
		h.Set("Content-Disposition", `form-data; name="file"; filename="`+filename+`"`)
		h.Set("Content-Type", "application/octet-stream")
		w, err := mw.CreatePart(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(audio)
	}
	mw.Close()
	return mw.FormDataContentType(), buf.Bytes()
}

func TestModelsEndpoints(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	resp, body := call(t, "GET", base+"/v1/models", "", nil, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID, Object, OwnedBy string
			Created             int64
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatal(err)
	}
	if list.Object != "list" || len(list.Data) != 2 || list.Data[0].ID != "demo" || list.Data[1].ID != "slow" {
		t.Fatalf("list %s", body)
	}
	for _, m := range list.Data {
		if m.Object != "model" || m.Created == 0 || !strings.Contains(string(body), `"owned_by":"mtor swarm"`) {
			t.Errorf("model %+v in %s", m, body)
		}
	}
	resp, body = call(t, "GET", base+"/v1/models/demo", "", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"id":"demo"`) {
		t.Errorf("single model: %d %s", resp.StatusCode, body)
	}
	resp, body = call(t, "GET", base+"/v1/models/org/none", "", nil, nil)
	if resp.StatusCode != 404 {
		t.Errorf("unknown model: %d", resp.StatusCode)
	}
	assertErrorShape(t, body, "model_not_found")
}

func TestChatCompletion(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"hello there swarm"}],"extra_field":{"ignored":true}}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	var out chatCompletion
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.ID, "chatcmpl-") || out.Object != "chat.completion" || out.Model != "demo" || out.Created == 0 {
		t.Errorf("envelope %s", body)
	}
	if len(out.Choices) != 1 || out.Choices[0].Message.Role != "assistant" || out.Choices[0].FinishReason != "stop" ||
		!strings.Contains(out.Choices[0].Message.Content, "You said: hello there swarm") {
		t.Errorf("choice %s", body)
	}
	if out.Usage.PromptTokens != 3 || out.Usage.CompletionTokens == 0 || out.Usage.TotalTokens != uint64(out.Usage.PromptTokens)+uint64(out.Usage.CompletionTokens) {
		t.Errorf("usage %+v", out.Usage)
	}
	if got := resp.Header.Get("X-Mtor-Peer"); got != sw.self.String() || out.Mtor == nil || out.Mtor.Peer != got || out.Mtor.Attempts != 1 {
		t.Errorf("peer header %q, mtor %+v", got, out.Mtor)
	}

	// max_tokens reached: finish_reason "length".
	_, body = postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"one two three four five"}],"max_tokens":2}`, nil)
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	if out.Choices[0].FinishReason != "length" || out.Usage.CompletionTokens != 2 {
		t.Errorf("max_tokens: %s", body)
	}

	// An image part routes as vision and reaches the worker.
	img := base64.StdEncoding.EncodeToString([]byte("\x89PNG\r\n\x1a\nfake"))
	resp, body = postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":[{"type":"text","text":"what is it"},{"type":"image_url","image_url":{"url":"data:image/png;base64,`+img+`"}}]}]}`, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), "received 1 image(s)") {
		t.Errorf("vision: %d %s", resp.StatusCode, body)
	}
}

// sseEvents reads "data:" payloads until the stream ends.
func sseEvents(t *testing.T, r io.Reader) []string {
	t.Helper()
	var events []string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, ":") {
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("unexpected SSE line %q", line)
		}
		events = append(events, data)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading SSE: %v", err)
	}
	return events
}

func TestChatStreaming(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	for _, includeUsage := range []bool{false, true} {
		body := `{"model":"demo","stream":true,"messages":[{"role":"user","content":"stream these words please"}]`
		if includeUsage {
			body += `,"stream_options":{"include_usage":true}`
		}
		body += "}"
		req, _ := http.NewRequest("POST", base+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
			t.Fatalf("status %d content-type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		events := sseEvents(t, resp.Body)
		resp.Body.Close()
		if resp.Trailer.Get("X-Mtor-Peer") != sw.self.String() {
			t.Errorf("trailer X-Mtor-Peer %q", resp.Trailer.Get("X-Mtor-Peer"))
		}
		if len(events) < 4 || events[len(events)-1] != "[DONE]" {
			t.Fatalf("events %q", events)
		}
		var text strings.Builder
		var id string
		finishes := 0
		sawUsage := false
		for i, ev := range events[:len(events)-1] {
			var raw map[string]json.RawMessage
			if err := json.Unmarshal([]byte(ev), &raw); err != nil {
				t.Fatalf("event %d not JSON: %q", i, ev)
			}
			var c struct {
				ID      string `json:"id"`
				Object  string `json:"object"`
				Created int64  `json:"created"`
				Model   string `json:"model"`
				Choices []struct {
					Index int `json:"index"`
					Delta struct {
						Role    *string `json:"role"`
						Content *string `json:"content"`
					} `json:"delta"`
					FinishReason *string `json:"finish_reason"`
				} `json:"choices"`
				Usage *usage `json:"usage"`
			}
			if err := json.Unmarshal([]byte(ev), &c); err != nil {
				t.Fatal(err)
			}
			if c.Object != "chat.completion.chunk" || c.Model != "demo" || c.Created == 0 || !strings.HasPrefix(c.ID, "chatcmpl-") {
				t.Errorf("chunk envelope %s", ev)
			}
			if id == "" {
				id = c.ID
			} else if c.ID != id {
				t.Errorf("chunk id changed: %s", ev)
			}
			if _, has := raw["usage"]; has != includeUsage {
				t.Errorf("usage key present=%v in %s", has, ev)
			}
			if len(c.Choices) == 0 {
				if !includeUsage || c.Usage == nil || c.Usage.PromptTokens != 4 || c.Usage.CompletionTokens == 0 || i != len(events)-2 {
					t.Errorf("usage chunk %s", ev)
				}
				sawUsage = true
				continue
			}
			ch := c.Choices[0]
			if i == 0 && (ch.Delta.Role == nil || *ch.Delta.Role != "assistant") {
				t.Errorf("first chunk has no assistant role: %s", ev)
			}
			if i > 0 && ch.Delta.Role != nil {
				t.Errorf("role repeated: %s", ev)
			}
			if ch.Delta.Content != nil {
				text.WriteString(*ch.Delta.Content)
			}
			if ch.FinishReason != nil {
				finishes++
				if *ch.FinishReason != "stop" || ch.Delta.Content != nil {
					t.Errorf("final chunk %s", ev)
				}
			}
		}
		if finishes != 1 || sawUsage != includeUsage {
			t.Errorf("finish chunks %d, usage chunk %v", finishes, sawUsage)
		}
		if !strings.Contains(text.String(), "You said: stream these words please") {
			t.Errorf("streamed text %q", text.String())
		}
	}
}

func TestStreamErrorAfterStart(t *testing.T) {
	fs := &fakeSwarm{
		events: []*pbEvent{accepted(), chunk("partial ")},
		err:    protoErr(codeBackend, "backend died at http://10.1.2.3:8000"),
	}
	_, base := startBridge(t, fs)
	resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","stream":true,"messages":[{"role":"user","content":"x"}]}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	events := sseEvents(t, bytes.NewReader(body))
	if len(events) != 3 {
		t.Fatalf("events %q", events)
	}
	if !strings.Contains(events[1], `"content":"partial "`) {
		t.Errorf("content event %s", events[1])
	}
	e := assertErrorShape(t, []byte(events[2]), "backend_error")
	if strings.Contains(e["message"].(string), "10.1.2.3") {
		t.Errorf("address in error event: %s", events[2])
	}
	for _, ev := range events {
		if ev == "[DONE]" {
			t.Errorf("[DONE] after an error")
		}
	}
}

// TestSwarmErrorStatus: each error the swarm returns reaches the client
// with its documented status, streamed or not, when nothing was sent yet.
func TestSwarmErrorStatus(t *testing.T) {
	tests := []struct {
		code   pbCode
		status int
		retry  bool
	}{
		{codeBusy, 429, true},
		{codeUnsupported, 503, false},
		{codeTimeout, 504, false},
		{codeBackend, 502, false},
		{codeInternal, 500, false},
		{codeTooLarge, 413, false},
		{codeBadRequest, 400, false},
	}
	for _, tc := range tests {
		for _, stream := range []bool{false, true} {
			fs := &fakeSwarm{err: protoErr(tc.code, "refused")}
			_, base := startBridge(t, fs, WithRetryAfter(3*time.Second))
			body := `{"model":"demo","messages":[{"role":"user","content":"x"}],"stream":` + map[bool]string{true: "true", false: "false"}[stream] + `}`
			resp, b := postJSON(t, base+"/v1/chat/completions", body, nil)
			if resp.StatusCode != tc.status {
				t.Errorf("%v stream=%v: status %d, want %d", tc.code, stream, resp.StatusCode, tc.status)
			}
			assertErrorShape(t, b, "")
			if got := resp.Header.Get("Retry-After"); (got == "3") != tc.retry {
				t.Errorf("%v: Retry-After %q", tc.code, got)
			}
		}
	}
}

func TestEmbeddings(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	var floats, b64 struct {
		Object string `json:"object"`
		Model  string `json:"model"`
		Data   []struct {
			Object    string          `json:"object"`
			Index     int             `json:"index"`
			Embedding json.RawMessage `json:"embedding"`
		} `json:"data"`
		Usage struct {
			PromptTokens int `json:"prompt_tokens"`
			TotalTokens  int `json:"total_tokens"`
		} `json:"usage"`
	}
	resp, body := postJSON(t, base+"/v1/embeddings", `{"model":"demo","input":["alpha","beta gamma"]}`, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	json.Unmarshal(body, &floats)
	_, body2 := postJSON(t, base+"/v1/embeddings", `{"model":"demo","input":["alpha","beta gamma"],"encoding_format":"base64"}`, nil)
	json.Unmarshal(body2, &b64)
	if floats.Object != "list" || floats.Model != "demo" || len(floats.Data) != 2 || len(b64.Data) != 2 {
		t.Fatalf("responses %s / %s", body, body2)
	}
	for i := range floats.Data {
		var vf []float32
		if err := json.Unmarshal(floats.Data[i].Embedding, &vf); err != nil || len(vf) == 0 {
			t.Fatalf("float vector %s", floats.Data[i].Embedding)
		}
		var s string
		if err := json.Unmarshal(b64.Data[i].Embedding, &s); err != nil {
			t.Fatalf("base64 vector %s", b64.Data[i].Embedding)
		}
		raw, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(raw) != 4*len(vf) {
			t.Fatalf("base64 vector of %d bytes for %d floats", len(raw), len(vf))
		}
		for j := range vf {
			if math.Float32frombits(binary.LittleEndian.Uint32(raw[4*j:])) != vf[j] {
				t.Fatalf("vector %d differs at %d", i, j)
			}
		}
		if floats.Data[i].Index != i || floats.Data[i].Object != "embedding" {
			t.Errorf("data[%d] = %+v", i, floats.Data[i])
		}
	}
	if floats.Usage.TotalTokens != floats.Usage.PromptTokens { // the demo counts no tokens for inputs
		t.Errorf("usage %+v", floats.Usage)
	}
}

func TestImagesAndSpeech(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	for _, format := range []string{"b64_json", "url", ""} {
		resp, body := postJSON(t, base+"/v1/images/generations", `{"prompt":"a red fox","size":"64x64","response_format":"`+format+`"}`, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
		var out struct {
			Created int64 `json:"created"`
			Data    []struct {
				B64JSON string `json:"b64_json"`
				URL     string `json:"url"`
			} `json:"data"`
		}
		json.Unmarshal(body, &out)
		if len(out.Data) != 1 || out.Created == 0 {
			t.Fatalf("%s", body)
		}
		b64 := out.Data[0].B64JSON
		if format == "url" {
			var ok bool
			b64, ok = strings.CutPrefix(out.Data[0].URL, "data:image/png;base64,")
			if !ok {
				t.Fatalf("url %.60s", out.Data[0].URL)
			}
		}
		png, err := base64.StdEncoding.DecodeString(b64)
		if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) {
			t.Errorf("%s: not a PNG", format)
		}
	}
	resp, body := postJSON(t, base+"/v1/audio/speech", `{"model":"demo","input":"hello","voice":"alloy"}`, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "audio/wav" || !bytes.HasPrefix(body, []byte("RIFF")) || resp.Header.Get("X-Mtor-Peer") == "" {
		t.Errorf("speech: %d %q %.8q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
}

func TestTranscription(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw, WithMaxMedia(1000))
	wav := append([]byte("RIFF\x00\x00\x00\x00WAVEfmt "), make([]byte, 100)...)
	ct, body := transcriptionBody(t, map[string]string{"model": "demo"}, "hello.wav", wav)
	resp, b := call(t, "POST", base+"/v1/audio/transcriptions", ct, body, nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"text":"[demo transcription from test] 116 bytes of audio received`) {
		t.Errorf("json: %d %s", resp.StatusCode, b)
	}
	ct, body = transcriptionBody(t, map[string]string{"model": "demo", "response_format": "text"}, "a.webm", wav)
	resp, b = call(t, "POST", base+"/v1/audio/transcriptions", ct, body, nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || !strings.HasPrefix(string(b), "[demo transcription") {
		t.Errorf("text: %d %s", resp.StatusCode, b)
	}
	bad := []struct {
		name   string
		fields map[string]string
		file   string
		audio  []byte
		status int
		param  string
	}{
		{"no file", map[string]string{"model": "demo"}, "", nil, 400, "file"},
		{"no model", map[string]string{}, "a.wav", wav, 400, "model"},
		{"unknown model", map[string]string{"model": "nope"}, "a.wav", wav, 404, "model"},
		{"too large", map[string]string{"model": "demo"}, "a.wav", make([]byte, 1001), 413, "file"},
		{"not audio", map[string]string{"model": "demo"}, "a.txt", []byte("plain words"), 400, "file"},
		{"bad format", map[string]string{"model": "demo", "response_format": "srt"}, "a.wav", wav, 400, "response_format"},
		{"bad temperature", map[string]string{"model": "demo", "temperature": "hot"}, "a.wav", wav, 400, "temperature"},
	}
	for _, tc := range bad {
		ct, body := transcriptionBody(t, tc.fields, tc.file, tc.audio)
		resp, b := call(t, "POST", base+"/v1/audio/transcriptions", ct, body, nil)
		if resp.StatusCode != tc.status {
			t.Errorf("%s: status %d, want %d: %s", tc.name, resp.StatusCode, tc.status, b)
			continue
		}
		if e := assertErrorShape(t, b, ""); e["param"] != tc.param {
			t.Errorf("%s: param %v, want %s", tc.name, e["param"], tc.param)
		}
	}
	resp, b = postJSON(t, base+"/v1/audio/transcriptions", `{"model":"demo"}`, nil)
	if resp.StatusCode != 400 {
		t.Errorf("JSON body: %d %s", resp.StatusCode, b)
	}
}

// TestBadInput: every endpoint answers bad input with its documented error.
func TestBadInput(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw, WithMaxBody(4096))
	big := `{"model":"demo","input":"` + strings.Repeat("x", 5000) + `"}`
	endpoints := []struct {
		path      string
		good      string // a valid body, for the unknown model case
		wrongType string
		field     string
	}{
		{"/v1/chat/completions", `{"model":"nope","messages":[{"role":"user","content":"x"}]}`, `{"model":"demo","messages":"hi"}`, "messages"},
		{"/v1/embeddings", `{"model":"nope","input":"x"}`, `{"model":123,"input":"x"}`, "model"},
		{"/v1/images/generations", `{"model":"nope","prompt":"x"}`, `{"prompt":["x"]}`, "prompt"},
		{"/v1/audio/speech", `{"model":"nope","input":"x"}`, `{"model":"demo","input":"x","speed":"fast"}`, "speed"},
	}
	for _, ep := range endpoints {
		url := base + ep.path
		cases := []struct {
			name, ct, body string
			status         int
			code, param    string
		}{
			{"invalid JSON", "application/json", `{"model":`, 400, "invalid_json", ""},
			{"not an object", "application/json", `[1,2]`, 400, "invalid_type", ""},
			{"trailing data", "application/json", `{} {}`, 400, "invalid_json", ""},
			{"empty body", "application/json", ``, 400, "invalid_json", ""},
			{"wrong type", "application/json", ep.wrongType, 400, "invalid_type", ep.field},
			{"form content type", "application/x-www-form-urlencoded", `a=b`, 400, "invalid_content_type", ""},
			{"oversized", "application/json", big, 413, "request_too_large", ""},
			{"unknown model", "application/json", ep.good, 404, "model_not_found", "model"},
		}
		for _, tc := range cases {
			resp, b := call(t, "POST", url, tc.ct, []byte(tc.body), nil)
			if resp.StatusCode != tc.status {
				t.Errorf("%s %s: status %d, want %d: %s", ep.path, tc.name, resp.StatusCode, tc.status, b)
				continue
			}
			e := assertErrorShape(t, b, tc.code)
			if tc.param != "" && e["param"] != tc.param {
				t.Errorf("%s %s: param %v, want %q", ep.path, tc.name, e["param"], tc.param)
			}
			if tc.name == "wrong type" && !strings.Contains(e["message"].(string), tc.param) {
				t.Errorf("%s: message %q does not name %q", ep.path, e["message"], tc.param)
			}
		}
	}
	// A model that exists but does not serve the type: 400.
	fs := &fakeSwarm{models: []routerModel{{Name: "chatonly", Types: []string{"chat"}, Peers: 1}}}
	_, fbase := startBridge(t, fs)
	resp, b := postJSON(t, fbase+"/v1/embeddings", `{"model":"chatonly","input":"x"}`, nil)
	if resp.StatusCode != 400 {
		t.Errorf("wrong type for model: %d %s", resp.StatusCode, b)
	}
	assertErrorShape(t, b, "model_type_unsupported")
	// Method and path errors keep the shape.
	resp, b = call(t, "GET", base+"/v1/chat/completions", "", nil, nil)
	if resp.StatusCode != 405 || resp.Header.Get("Allow") != "POST" {
		t.Errorf("GET chat: %d", resp.StatusCode)
	}
	assertErrorShape(t, b, "method_not_allowed")
	resp, b = call(t, "POST", base+"/v1/completions", "application/json", []byte(`{}`), nil)
	if resp.StatusCode != 404 {
		t.Errorf("unknown path: %d", resp.StatusCode)
	}
	assertErrorShape(t, b, "unknown_url")
}

func TestAPIKeys(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keys")
	os.WriteFile(path, []byte("# bridge keys\n\nsk-first\n  sk-second  \n"), 0o600)
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw, WithAPIKeyFile(path))
	tests := []struct {
		auth   string
		status int
	}{
		{"", 401},
		{"Bearer wrong", 401},
		{"Basic c2stZmlyc3Q6", 401},
		{"Bearer sk-first", 200},
		{"bearer sk-second", 200},
		{"Bearer sk-first-not", 401},
	}
	for _, tc := range tests {
		h := map[string]string{}
		if tc.auth != "" {
			h["Authorization"] = tc.auth
		}
		resp, b := call(t, "GET", base+"/v1/models", "", nil, h)
		if resp.StatusCode != tc.status {
			t.Errorf("%q: %d, want %d", tc.auth, resp.StatusCode, tc.status)
		}
		if tc.status == 401 {
			assertErrorShape(t, b, "invalid_api_key")
			if resp.Header.Get("WWW-Authenticate") == "" {
				t.Errorf("401 without WWW-Authenticate")
			}
		}
	}
	// POSTs are checked before their body is read.
	resp, b := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}]}`, map[string]string{"Authorization": "Bearer nope"})
	if resp.StatusCode != 401 {
		t.Errorf("chat with a bad key: %d %s", resp.StatusCode, b)
	}
	// Health, metrics and the swarm view stay open.
	for _, p := range []string{"/healthz", "/metrics", "/api/swarm"} {
		if resp, _ := call(t, "GET", base+p, "", nil, nil); resp.StatusCode != 200 {
			t.Errorf("%s without key: %d", p, resp.StatusCode)
		}
	}
	// Bad configurations are refused.
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte("# nothing\n"), 0o600)
	for name, opt := range map[string]Option{
		"empty file":   WithAPIKeyFile(empty),
		"missing file": WithAPIKeyFile(filepath.Join(dir, "absent")),
		"blank key":    WithAPIKeys([]string{""}),
		"key w/ space": WithAPIKeys([]string{"a b"}),
	} {
		if _, err := New(sw, opt); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
}

func TestCORS(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw, WithCORSOrigins([]string{"https://app.example"}), WithAPIKeys([]string{"k"}))
	auth := map[string]string{"Authorization": "Bearer k"}
	with := func(origin string) map[string]string {
		return map[string]string{"Authorization": "Bearer k", "Origin": origin}
	}
	// Allowed origin: headers set.
	resp, _ := call(t, "GET", base+"/v1/models", "", nil, with("https://app.example"))
	if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != "https://app.example" {
		t.Errorf("allowed origin: %d %v", resp.StatusCode, resp.Header)
	}
	// Forbidden origin: 403 in OpenAI's shape, before anything runs.
	resp, b := postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}]}`, with("https://evil.example"))
	if resp.StatusCode != 403 || resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("forbidden origin: %d", resp.StatusCode)
	}
	assertErrorShape(t, b, "origin_not_allowed")
	// Same origin (the web UI) is always allowed.
	resp, _ = call(t, "GET", base+"/v1/models", "", nil, with(base))
	if resp.StatusCode != 200 {
		t.Errorf("same origin: %d", resp.StatusCode)
	}
	// Preflight: no key needed, allowed origin gets 204 with the headers.
	pre := map[string]string{"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
	resp, _ = call(t, "OPTIONS", base+"/v1/chat/completions", "", nil, pre)
	if resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Headers") != "authorization, content-type, x-stainless-os" ||
		!strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "POST") {
		t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
	}
	pre["Origin"] = "https://evil.example"
	resp, b = call(t, "OPTIONS", base+"/v1/chat/completions", "", nil, pre)
	if resp.StatusCode != 403 {
		t.Errorf("forbidden preflight: %d", resp.StatusCode)
	}
	assertErrorShape(t, b, "origin_not_allowed")
	// No Origin (not a browser): no CORS headers, request served.
	resp, _ = call(t, "GET", base+"/v1/models", "", nil, auth)
	if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("no origin: %d %v", resp.StatusCode, resp.Header)
	}
	// "*" allows any origin, explicitly configured.
	_, base2 := startBridge(t, sw, WithCORSOrigins([]string{"*"}))
	resp, _ = call(t, "GET", base2+"/v1/models", "", nil, map[string]string{"Origin": "https://any.example"})
	if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != "https://any.example" {
		t.Errorf("wildcard: %d %v", resp.StatusCode, resp.Header)
	}
	// Without configuration, cross-origin is refused.
	_, base3 := startBridge(t, sw)
	resp, _ = call(t, "GET", base3+"/api/swarm", "", nil, map[string]string{"Origin": "https://any.example"})
	if resp.StatusCode != 403 {
		t.Errorf("default policy: %d", resp.StatusCode)
	}
}

func TestHealthzSwarmMetrics(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	resp, b := call(t, "GET", base+"/healthz", "", nil, nil)
	if resp.StatusCode != 200 || strings.TrimSpace(string(b)) != `{"peers":1,"status":"ok"}` {
		t.Errorf("healthz %d %s", resp.StatusCode, b)
	}
	resp, b = call(t, "GET", base+"/api/swarm", "", nil, nil)
	var view struct {
		Peers  []map[string]any `json:"peers"`
		Models []map[string]any `json:"models"`
		Self   string           `json:"self"`
	}
	if err := json.Unmarshal(b, &view); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	if view.Self != sw.self.String() || len(view.Peers) != 1 || len(view.Models) != 2 || view.Peers[0]["peer"] != view.Self {
		t.Errorf("swarm view %s", b)
	}
	for _, leak := range []string{"/ip4/", "/ip6/", "127.0.0.1", "addr"} {
		if strings.Contains(string(b), leak) {
			t.Errorf("swarm view contains %q: %s", leak, b)
		}
	}
	// One good and one failed query show up in the metrics.
	postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"count me"}]}`, nil)
	postJSON(t, base+"/v1/embeddings", `{"model":"demo","input":"x"}`, nil)
	_, m := call(t, "GET", base+"/metrics", "", nil, nil)
	for _, want := range []string{
		`mtor_bridge_queries_total{model="demo",outcome="ok",type="chat"} 1`,
		`mtor_bridge_queries_total{model="demo",outcome="ok",type="embed"} 1`,
		`mtor_bridge_query_duration_seconds_count{type="chat"} 1`,
		`mtor_bridge_ttft_seconds_count{type="chat"} 1`,
		"mtor_bridge_in_flight 0",
		"mtor_swarm_peers 1",
		"mtor_bridge_connections 0",
		"go_goroutines",
		"process_cpu_seconds_total",
	} {
		if !strings.Contains(string(m), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestModelLabelBounded: a model nobody serves, as the WebSocket may send,
// is counted as "other", keeping the label set bounded.
func TestModelLabelBounded(t *testing.T) {
	fs := &fakeSwarm{err: protoErr(codeUnsupported, "no")}
	b, base := startBridge(t, fs)
	req := &pbQueryRequest{Id: make([]byte, 16), Type: 1, Model: "random-name-1", Prompt: "x"}
	if _, err := b.Swarm().Query(context.Background(), req, func(*pbEvent) error { return nil }); err == nil {
		t.Fatal("want error")
	}
	_, m := call(t, "GET", base+"/metrics", "", nil, nil)
	if !strings.Contains(string(m), `mtor_bridge_queries_total{model="other",outcome="unsupported",type="chat"} 1`) || strings.Contains(string(m), "random-name-1") {
		t.Errorf("metrics:\n%s", m)
	}
}

func TestOptionsRefused(t *testing.T) {
	sw := &fakeSwarm{}
	for name, opt := range map[string]Option{
		"origin without scheme": WithCORSOrigins([]string{"app.example"}),
		"origin with path":      WithCORSOrigins([]string{"https://app.example/x"}),
		"zero body":             WithMaxBody(0),
		"negative media":        WithMaxMedia(-1),
		"zero timeout":          WithQueryTimeout(0),
		"sub-second retry":      WithRetryAfter(time.Millisecond),
		"nil registry":          WithRegistry(nil),
	} {
		if _, err := New(sw, opt); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(nil); err == nil {
		t.Error("nil swarm accepted")
	}
	if _, err := New(sw, WithCORSOrigins([]string{"*", "http://127.0.0.1:3000", "https://app.example/"})); err != nil {
		t.Errorf("good origins refused: %v", err)
	}
}

// TestSpeechInPieces: a worker that sends its audio in several Media
// events (docs/protocol.md §5.1: concatenate them) gives the client all of
// it, in order; pieces of different formats are a 502.
func TestSpeechInPieces(t *testing.T) {
	media := mediaEvent
	for _, tc := range []struct {
		name   string
		events []*pbEvent
		status int
		body   string
	}{
		{"pieces", []*pbEvent{accepted(), media("audio/mpeg", "AAAA"), media("audio/mpeg", "BBBB"), media("audio/mpeg", "CC")}, 200, "AAAABBBBCC"},
		{"one piece", []*pbEvent{accepted(), media("audio/mpeg", "AAAA")}, 200, "AAAA"},
		{"mixed formats", []*pbEvent{accepted(), media("audio/mpeg", "AAAA"), media("audio/wav", "BBBB")}, 502, ""},
		{"no audio", []*pbEvent{accepted()}, 502, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, base := startBridge(t, &fakeSwarm{events: tc.events})
			resp, body := postJSON(t, base+"/v1/audio/speech", `{"model":"demo","input":"hello"}`, nil)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, body)
			}
			if tc.status == 200 && (string(body) != tc.body || resp.Header.Get("Content-Type") != "audio/mpeg") {
				t.Fatalf("body %q (%s), want %q (audio/mpeg)", body, resp.Header.Get("Content-Type"), tc.body)
			}
		})
	}
}

// TestOllamaAPIRefusalsInOllamasShape: what the wrappers every API shares
// refuse (no key, too large a body) comes in the Ollama
// API's error shape under /api/, {"error": "..."}, which Ollama's clients
// read, and in OpenAI's under /v1/.
func TestOllamaAPIRefusalsInOllamasShape(t *testing.T) {
	_, base := startBridge(t, &fakeSwarm{}, WithAPIKeys([]string{"k"}), WithMaxBody(100))
	for _, tc := range []struct {
		name, path, body string
		header           map[string]string
		status           int
	}{
		{"no key", "/api/chat", `{}`, nil, http.StatusUnauthorized},
		{"too large", "/api/chat", strings.Repeat(" ", 200), map[string]string{"Authorization": "Bearer k"}, http.StatusRequestEntityTooLarge},
		{"foreign origin", "/api/chat", `{}`, map[string]string{"Authorization": "Bearer k", "Origin": "https://elsewhere.example"}, http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, prefix := range []string{"ollama", "openai"} {
				path := tc.path
				if prefix == "openai" {
					path = "/v1/chat/completions"
				}
				resp, b := call(t, http.MethodPost, base+path, "application/json", []byte(tc.body), tc.header)
				if resp.StatusCode != tc.status {
					t.Fatalf("%s %s: status %d (%s), want %d", prefix, path, resp.StatusCode, b, tc.status)
				}
				var shape map[string]any
				if err := json.Unmarshal(b, &shape); err != nil {
					t.Fatalf("%s: %q: %v", prefix, b, err)
				}
				_, isString := shape["error"].(string)
				if isString != (prefix == "ollama") {
					t.Fatalf("%s %s: error %q in the wrong shape", prefix, path, b)
				}
			}
		})
	}
	// The Host check, which guards every path before any API's own
	// wrappers: Ollama's shape under /api/, mtor's own (OpenAI's) on
	// /api/swarm and elsewhere.
	_, open := startBridge(t, &fakeSwarm{})
	for _, tc := range []struct {
		path   string
		ollama bool
	}{{"/api/tags", true}, {"/api/swarm", false}, {"/v1/models", false}} {
		req, err := http.NewRequest(http.MethodGet, open+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "elsewhere.example"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var shape map[string]any
		if err := json.Unmarshal(b, &shape); err != nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("%s with a foreign Host: %d %q (%v), want 403", tc.path, resp.StatusCode, b, err)
		}
		if _, isString := shape["error"].(string); isString != tc.ollama {
			t.Fatalf("%s with a foreign Host: error %q in the wrong shape", tc.path, b)
		}
	}
}

// TestOllamaLoadAndContentType: an empty conversation or prompt loads the
// model, as in Ollama (clients send one to preload it), for a model the
// swarm serves and not for others; and the Ollama API reads its body as
// JSON whatever the Content-Type, as Ollama does (curl -d, in Ollama's own
// examples, sends a form's).
func TestOllamaLoadAndContentType(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw)
	for _, tc := range []struct {
		name, path, ct, body string
		status               int
		want                 string // in the body
	}{
		{"chat: empty conversation loads", "/api/chat", "application/json", `{"model":"demo","messages":[]}`, 200, `"done_reason":"load"`},
		{"chat: no messages loads", "/api/chat", "application/json", `{"model":"demo","stream":false}`, 200, `"done_reason":"load"`},
		{"chat: an unknown model does not load", "/api/chat", "application/json", `{"model":"nope","messages":[]}`, 404, `model 'nope' not found`},
		{"generate: empty prompt loads", "/api/generate", "application/json", `{"model":"demo"}`, 200, `"done_reason":"load"`},
		{"generate: an unknown model does not load", "/api/generate", "application/json", `{"model":"nope"}`, 404, `model 'nope' not found`},
		{"chat: curl -d's content type", "/api/chat", "application/x-www-form-urlencoded", `{"model":"demo","stream":false,"messages":[{"role":"user","content":"hi"}]}`, 200, `"done_reason":"stop"`},
		{"generate: no content type", "/api/generate", "", `{"model":"demo","stream":false,"prompt":"hi"}`, 200, `"done_reason":"stop"`},
		{"chat: still JSON", "/api/chat", "application/x-www-form-urlencoded", `model=demo`, 400, `error`},
		{"chat: m:latest is m", "/api/chat", "application/json", `{"model":"demo:latest","stream":false,"messages":[{"role":"user","content":"hi"}]}`, 200, `"done_reason":"stop"`},
		{"show: m:latest is m", "/api/show", "application/json", `{"model":"demo:latest"}`, 200, `capabilities`},
		{"chat: another tag is another model", "/api/chat", "application/json", `{"model":"demo:7b","messages":[]}`, 404, `not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, b := call(t, http.MethodPost, base+tc.path, tc.ct, []byte(tc.body), nil)
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.want) {
				t.Fatalf("status %d %s, want %d with %s", resp.StatusCode, b, tc.status, tc.want)
			}
		})
	}
	// A model that serves vision queries only loads too.
	_, vbase := startBridge(t, &fakeSwarm{models: []routerModel{{Name: "eyes", Types: []string{"vision"}, Peers: 1}}})
	if resp, b := postJSON(t, vbase+"/api/chat", `{"model":"eyes","messages":[]}`, nil); resp.StatusCode != 200 || !strings.Contains(string(b), `"done_reason":"load"`) {
		t.Fatalf("preload of a vision-only model: %d %s", resp.StatusCode, b)
	}
}
