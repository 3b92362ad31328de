package ws_test

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// waitLimit bounds every wait in these tests; it is generous so that a
// loaded machine does not fail them, and no test asserts on speed.
const waitLimit = 60 * time.Second

type msg map[string]any

func (m msg) str(k string) string { s, _ := m[k].(string); return s }

type harness struct {
	t     *testing.T
	srv   *ws.Server
	swarm *wstest.DemoSwarm // nil when the server runs on another Swarm
	http  *httptest.Server
	url   string // ws://127.0.0.1:port/
}

// newHarness serves /ws on 127.0.0.1 over the in-process demo swarm sw (a
// new one when nil).
func newHarness(t *testing.T, sw *wstest.DemoSwarm, opts ...ws.Option) *harness {
	t.Helper()
	if sw == nil {
		var err error
		if sw, err = wstest.New(); err != nil {
			t.Fatal(err)
		}
	}
	h := newHarnessOn(t, sw, opts...)
	h.swarm = sw
	return h
}

// newHarnessOn serves /ws on 127.0.0.1 over any Swarm.
func newHarnessOn(t *testing.T, sw ws.Swarm, opts ...ws.Option) *harness {
	t.Helper()
	srv := ws.New(sw, opts...)
	hs := httptest.NewServer(srv)
	t.Cleanup(func() {
		srv.Close()
		hs.Close()
	})
	return &harness{t: t, srv: srv, http: hs, url: "ws" + strings.TrimPrefix(hs.URL, "http") + "/"}
}

type client struct {
	t   *testing.T
	c   *websocket.Conn
	ctx context.Context
}

func (h *harness) dial(hdr http.Header, query string) (*client, *http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*waitLimit)
	h.t.Cleanup(cancel)
	c, resp, err := websocket.Dial(ctx, h.url+query, &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		return nil, resp, err
	}
	c.SetReadLimit(64 << 20)
	h.t.Cleanup(func() { c.CloseNow() })
	return &client{t: h.t, c: c, ctx: ctx}, resp, nil
}

func (h *harness) mustDial() *client {
	h.t.Helper()
	c, _, err := h.dial(nil, "")
	if err != nil {
		h.t.Fatalf("dial: %v", err)
	}
	return c
}

func (c *client) send(v any) {
	c.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.c.Write(c.ctx, websocket.MessageText, b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *client) read() (msg, error) {
	ctx, cancel := context.WithTimeout(c.ctx, waitLimit)
	defer cancel()
	_, b, err := c.c.Read(ctx)
	if err != nil {
		return nil, err
	}
	var m msg
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("bad JSON %q: %w", b, err)
	}
	return m, nil
}

// until reads messages until one of type typ arrives and returns it with
// everything read before it.
func (c *client) until(typs ...string) (msg, []msg) {
	c.t.Helper()
	var seen []msg
	for {
		m, err := c.read()
		if err != nil {
			c.t.Fatalf("waiting for %s: %v (seen %v)", strings.Join(typs, " or "), err, types(seen))
		}
		if slices.Contains(typs, m.str("type")) {
			return m, seen
		}
		seen = append(seen, m)
	}
}

// types names the messages, with the text of any error, for failures.
func types(ms []msg) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.str("type")
		if out[i] == "error" {
			out[i] += "(" + m.str("code") + ": " + m.str("message") + ")"
		}
	}
	return out
}

// hello reads what the server sends on connect.
func (c *client) hello() (cookie, info, workers msg) {
	c.t.Helper()
	cookie, _ = c.until("set_cookie")
	info, _ = c.until("user_info")
	workers, _ = c.until("worker_update")
	return
}

func submit(prompt, qtype, model string) msg {
	return msg{"type": "submit_query", "query": msg{"prompt": prompt, "query_type": qtype, "model_type": "worker_node", "model_name": model}}
}

func TestConnectSendsCookieAndUserInfo(t *testing.T) {
	h := newHarness(t, nil)
	known := uuid.NewString()
	tests := []struct {
		name   string
		cookie string
		want   string // "" = any new UUID
	}{
		{"no cookie", "", ""},
		{"valid cookie kept", known, known},
		{"invalid cookie replaced", "<script>", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hdr := http.Header{}
			if tt.cookie != "" {
				hdr.Set("Cookie", "user_guid="+tt.cookie)
			}
			c, _, err := h.dial(hdr, "")
			if err != nil {
				t.Fatal(err)
			}
			cookie, info, _ := c.hello()
			if cookie.str("name") != "user_guid" {
				t.Errorf("set_cookie name = %q", cookie.str("name"))
			}
			guid := cookie.str("value")
			if _, err := uuid.Parse(guid); err != nil || len(guid) != 36 {
				t.Errorf("guid %q is not a UUID", guid)
			}
			if tt.want != "" && guid != tt.want {
				t.Errorf("guid = %q, want the cookie's %q", guid, tt.want)
			}
			if tt.want == "" && guid == known {
				t.Errorf("new connection got the other user's guid")
			}
			data, _ := info["data"].(map[string]any)
			if data["guid"] != guid {
				t.Errorf("user_info guid %v != cookie %q", data["guid"], guid)
			}
			if data["is_sysop"] != false {
				t.Errorf("is_sysop = %v, want false", data["is_sysop"])
			}
			// The seed client calls toFixed on these: they must be numbers.
			for _, k := range []string{"query_count", "total_query_time", "total_cost"} {
				if _, ok := data[k].(float64); !ok {
					t.Errorf("user_info %s = %#v, want a number", k, data[k])
				}
			}
			if n, _ := data["nickname"].(string); n == "" {
				t.Errorf("user_info has no nickname")
			}
		})
	}
}

var (
	multiaddrRe = regexp.MustCompile(`/(ip4|ip6|dns|dns4|dns6|tcp|udp|quic|quic-v1|p2p|p2p-circuit|ws|wss)(/|$)`)
	hostPortRe  = regexp.MustCompile(`(^|[^0-9a-zA-Z])([0-9]{1,3}(\.[0-9]{1,3}){3}|\[[0-9a-fA-F:]+\]|localhost)(:[0-9]+)?`)
)

// strings walks a decoded JSON value and returns every string in it.
func allStrings(v any, out *[]string) {
	switch x := v.(type) {
	case string:
		*out = append(*out, x)
	case []any:
		for _, e := range x {
			allStrings(e, out)
		}
	case map[string]any:
		for k, e := range x {
			*out = append(*out, k)
			allStrings(e, out)
		}
	}
}

func TestWorkerUpdateOneEntryPerModelAndTypeWithoutAddresses(t *testing.T) {
	h := newHarness(t, nil)
	_, _, wu := h.mustDial().hello()
	workers, _ := wu["workers"].([]any)
	got := map[string]string{} // name -> type
	for _, w := range workers {
		e := w.(map[string]any)
		if e["address"] != "swarm" {
			t.Errorf("address = %v, want the label \"swarm\"", e["address"])
		}
		if _, ok := e["health_score"].(float64); !ok {
			t.Errorf("health_score %#v is not a number", e["health_score"])
		}
		if _, ok := e["is_blacklisted"].(bool); !ok {
			t.Errorf("is_blacklisted %#v is not a bool", e["is_blacklisted"])
		}
		if _, err := time.Parse(time.RFC3339, e["last_active"].(string)); err != nil {
			t.Errorf("last_active: %v", err)
		}
		if e["model"] != "demo" {
			t.Errorf("model = %v, want demo", e["model"])
		}
		got[e["name"].(string)] = e["type"].(string)
	}
	want := map[string]string{
		"demo": "chat", "demo [vision]": "vision", "demo [imagine]": "imagine",
		"demo [speech]": "speech", "demo [tts]": "tts", "demo [embed]": "embed",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("workers = %v, want %v", got, want)
	}
	var all []string
	allStrings(map[string]any(wu), &all)
	for _, s := range all {
		if multiaddrRe.MatchString(s) || hostPortRe.MatchString(s) {
			t.Errorf("worker_update carries something like a network address: %q", s)
		}
	}
}

// TestSubmitQueryPrefer: query.prefer ("energy", "latency") reaches the
// router with the query, absent it is the node's default, and any other
// value is refused with BAD_REQUEST before anything is routed; the same
// for text_to_speech's prefer.
func TestSubmitQueryPrefer(t *testing.T) {
	h := newHarness(t, nil)
	c := h.mustDial()
	c.hello()
	for _, tc := range []struct {
		prefer string
		want   router.EnergyPreference
	}{{"energy", router.EnergyPrefer}, {"Latency", router.EnergyIgnore}, {"", router.EnergyDefault}} {
		q := submit("which worker?", "chat", "demo")
		if tc.prefer != "" {
			q["query"].(msg)["prefer"] = tc.prefer
		}
		c.send(q)
		c.until("query_done")
		if got := h.swarm.LastPreference(); got != tc.want {
			t.Errorf("prefer %q: the router got %v, want %v", tc.prefer, got, tc.want)
		}
	}
	before := h.swarm.Queries()
	q := submit("which worker?", "chat", "demo")
	q["query"].(msg)["prefer"] = "cheapest"
	c.send(q)
	e, _ := c.until("error")
	if e.str("code") != "BAD_REQUEST" || !strings.Contains(e.str("message"), "prefer") {
		t.Errorf("error = %v, want BAD_REQUEST about prefer", e)
	}
	if n := h.swarm.Queries(); n != before {
		t.Errorf("%d queries routed for a refused one", n-before)
	}
	// The seed's own query messages take it beside their other fields.
	c.send(msg{"type": "text_to_speech", "text": "say it frugally", "prefer": "energy"})
	c.until("speech_result")
	if got := h.swarm.LastPreference(); got != router.EnergyPrefer {
		t.Errorf("text_to_speech with prefer energy: the router got %v", got)
	}
	before = h.swarm.Queries()
	c.send(msg{"type": "text_to_speech", "text": "say it", "prefer": "cheapest"})
	if e, _ := c.until("error"); e.str("code") != "BAD_REQUEST" || !strings.Contains(e.str("message"), "prefer") {
		t.Errorf("error = %v, want BAD_REQUEST about prefer", e)
	}
	if n := h.swarm.Queries(); n != before {
		t.Errorf("%d queries routed for a refused one", n-before)
	}
}

func TestSubmitQueryChatStreamsAndAnswers(t *testing.T) {
	h := newHarness(t, nil)
	c := h.mustDial()
	c.hello()
	c.send(submit("hello swarm of many words", "chat", "demo"))
	started, _ := c.until("query_started")
	id := started.str("query_id")
	if id == "" || started.str("model") != "demo" || started.str("query_type") != "chat" {
		t.Fatalf("query_started = %v", started)
	}
	res, before := c.until("query_result")
	var streamed strings.Builder
	chunks := 0
	for _, m := range before {
		if m.str("type") == "query_chunk" {
			if m.str("query_id") != id {
				t.Errorf("chunk for query %q, want %q", m.str("query_id"), id)
			}
			streamed.WriteString(m.str("text"))
			chunks++
		}
	}
	if chunks < 3 {
		t.Errorf("got %d query_chunk events, want the answer streamed word by word", chunks)
	}
	if res.str("result_type") != "text" || !strings.Contains(res.str("result"), "You said: hello swarm of many words") {
		t.Errorf("query_result = %v", res)
	}
	if res.str("result") != streamed.String() {
		t.Errorf("result %q != streamed text %q", res.str("result"), streamed.String())
	}
	if _, ok := res["processing_time"].(float64); !ok {
		t.Errorf("processing_time %#v is not a number", res["processing_time"])
	}
	if cost, ok := res["cost"].(float64); !ok || cost != 0 {
		t.Errorf("cost = %#v, want 0", res["cost"])
	}
	done, _ := c.until("query_done")
	if done.str("query_id") != id || done.str("peer") != h.swarm.Peer().String() {
		t.Errorf("query_done = %v, want peer %s", done, h.swarm.Peer())
	}
	if n, _ := done["completion_tokens"].(float64); n < 3 {
		t.Errorf("completion_tokens = %v", done["completion_tokens"])
	}
	if tps, _ := done["tokens_per_sec"].(float64); tps <= 0 {
		t.Errorf("tokens_per_sec = %v, want > 0", done["tokens_per_sec"])
	}
	if _, has := done["energy_mj"]; has {
		t.Errorf("energy_mj reported although the worker measured none: %v", done["energy_mj"])
	}
	q, _ := c.until("queue_update")
	if q["depth"] != float64(0) || q["total"].(float64) < 1 {
		t.Errorf("final queue_update = %v", q)
	}
}

func TestEnergyReportedWhenTheWorkerMeasuresIt(t *testing.T) {
	sw, err := wstest.New(wstest.WithFakeEnergy(7))
	if err != nil {
		t.Fatal(err)
	}
	c := newHarness(t, sw).mustDial()
	c.hello()
	c.send(submit("one two three", "chat", "demo"))
	done, _ := c.until("query_done")
	tokens, _ := done["completion_tokens"].(float64)
	if done["energy_mj"] != 7*tokens {
		t.Errorf("energy_mj = %v, want %v", done["energy_mj"], 7*tokens)
	}
}

func TestSubmitQueryMediaTypes(t *testing.T) {
	h := newHarness(t, nil)
	c := h.mustDial()
	c.hello()
	tests := []struct {
		qtype, model string
		resultType   string
		magic        []byte
	}{
		{"imagine", "demo [imagine]", "image", []byte("\x89PNG")},
		{"imagine", "no-such-model", "image", []byte("\x89PNG")}, // routed by type, as the seed did
		{"tts", "demo", "audio", []byte("RIFF")},
	}
	for _, tt := range tests {
		t.Run(tt.qtype+"/"+tt.model, func(t *testing.T) {
			c.send(submit("a red fox", tt.qtype, tt.model))
			started, _ := c.until("query_started")
			if started.str("model") != "demo" {
				t.Errorf("routed to model %q, want demo", started.str("model"))
			}
			res, _ := c.until("query_result")
			if res.str("result_type") != tt.resultType {
				t.Fatalf("result_type = %q, want %q", res.str("result_type"), tt.resultType)
			}
			data, err := base64.StdEncoding.DecodeString(res.str("result"))
			if err != nil || !bytes.HasPrefix(data, tt.magic) {
				t.Errorf("result is not base64 of %q: %v", tt.magic, err)
			}
			c.until("query_done")
		})
	}
}

// webm is the start of a WebM file (an EBML header); the demo's
// speech-to-text only counts bytes.
var webm = append([]byte{0x1a, 0x45, 0xdf, 0xa3, 0x9f, 0x42, 0x86, 0x81, 0x01}, bytes.Repeat([]byte{0x55}, 300)...)

func TestSpeechQueryTranscribesThenAnswersAsChat(t *testing.T) {
	h := newHarness(t, nil)
	c := h.mustDial()
	c.hello()
	c.send(msg{"type": "submit_query", "query": msg{
		"prompt": "", "query_type": "speech", "model_type": "worker_node", "model_name": "demo",
		"audio": base64.StdEncoding.EncodeToString(webm),
	}})
	tr, _ := c.until("query_transcript")
	if !strings.Contains(tr.str("text"), fmt.Sprintf("%d bytes of audio received", len(webm))) {
		t.Errorf("transcript = %q", tr.str("text"))
	}
	res, _ := c.until("query_result")
	if res.str("result_type") != "text" || !strings.Contains(res.str("result"), "You said: "+tr.str("text")) {
		t.Errorf("answer %q does not answer the transcript %q", res.str("result"), tr.str("text"))
	}
	done, _ := c.until("query_done")
	steps, _ := done["steps"].([]any)
	if len(steps) != 2 || steps[0].(map[string]any)["query_type"] != "speech" || steps[1].(map[string]any)["query_type"] != "chat" {
		t.Errorf("steps = %v, want speech then chat", steps)
	}
}

func TestSpeechWithSpokenAnswer(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	// The seed's wake-word mode sets model_type "speech": the answer comes
	// back as audio.
	c.send(msg{"type": "submit_query", "query": msg{
		"prompt": "", "query_type": "speech", "model_type": "speech", "model_name": "demo",
		"audio": base64.StdEncoding.EncodeToString(webm),
	}})
	res, _ := c.until("query_result")
	if res.str("result_type") != "audio" {
		t.Fatalf("result_type = %q, want audio", res.str("result_type"))
	}
	if data, _ := base64.StdEncoding.DecodeString(res.str("result")); !bytes.HasPrefix(data, []byte("RIFF")) {
		t.Errorf("spoken answer is not a WAV")
	}
}

func TestSpeechToText(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	c.send(msg{"type": "speech_to_text", "audio": base64.StdEncoding.EncodeToString(webm)})
	tr, _ := c.until("transcription_result")
	if !strings.Contains(tr.str("text"), "bytes of audio received") {
		t.Errorf("transcription_result = %v", tr)
	}
}

func testPNG(t *testing.T, w, h int) []byte {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.RGBA{uint8(x * 7), uint8(y * 13), uint8(x ^ y), 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// chunks splits s as the seed client does, into pieces of size n.
func chunks(s string, n int) []string {
	var out []string
	for len(s) > n {
		out = append(out, s[:n])
		s = s[n:]
	}
	return append(out, s)
}

func visionChunk(i, total int, data, imageID, prompt string) msg {
	return msg{"type": "vision_chunk", "chunk_id": i, "total_chunks": total, "chunk_data": data, "image_id": imageID,
		"prompt": prompt, "query_type": "vision", "model_type": "worker_node", "model_name": "demo [vision]"}
}

func TestVisionChunksReassembledAndAnswered(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	b64 := base64.StdEncoding.EncodeToString(testPNG(t, 64, 64))
	parts := chunks(b64, len(b64)/4)
	if len(parts) < 4 {
		t.Fatalf("want several chunks, got %d", len(parts))
	}
	// Out of order, as nothing in the seed guarantees order.
	order := []int{1, 0}
	for i := 2; i < len(parts); i++ {
		order = append(order, i)
	}
	for _, i := range order {
		c.send(visionChunk(i, len(parts), parts[i], "1700000000000", "what is in this picture?"))
	}
	complete, before := c.until("vision_upload_complete")
	received := 0
	for _, m := range before {
		if m.str("type") == "vision_chunk_received" {
			received++
		}
	}
	if received != len(parts)-1 || complete.str("message") == "" {
		t.Errorf("got %d vision_chunk_received and %v, want %d and a message", received, complete, len(parts)-1)
	}
	res, _ := c.until("query_result")
	if !strings.Contains(res.str("result"), "received 1 image(s) and the question: what is in this picture?") {
		t.Errorf("vision answer = %q", res.str("result"))
	}
}

func TestInlineVisionImage(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	// The seed's camera mode sends the frame inline and a model name that
	// the swarm may not serve.
	c.send(msg{"type": "submit_query", "query": msg{"prompt": "Describe this image in detail", "query_type": "vision",
		"model_type": "worker_node", "model_name": "default_vision_model",
		"image": base64.StdEncoding.EncodeToString(testPNG(t, 8, 8))}})
	res, _ := c.until("query_result")
	if !strings.Contains(res.str("result"), "received 1 image(s)") {
		t.Errorf("vision answer = %q", res.str("result"))
	}
}

func TestVisionUploadLimits(t *testing.T) {
	h := newHarness(t, nil, ws.WithMaxVisionBytes(1000), ws.WithMaxVisionChunks(4), ws.WithVisionTimeout(200*time.Millisecond))
	c := h.mustDial()
	c.hello()
	tests := []struct {
		name string
		msgs []msg
		want string
	}{
		{"too many chunks", []msg{visionChunk(0, 5, "AAAA", "a", "p")}, "total_chunks 5 out of range"},
		{"too many bytes", []msg{visionChunk(0, 2, strings.Repeat("A", 600), "b", "p"), visionChunk(1, 2, strings.Repeat("A", 600), "b", "p")}, "vision upload too large"},
		{"chunk out of range", []msg{visionChunk(3, 2, "AAAA", "c", "p")}, "chunk_id 3 out of range"},
		{"total changed", []msg{visionChunk(0, 2, "AAAA", "d", "p"), visionChunk(1, 3, "AAAA", "d", "p")}, "total_chunks changed"},
		{"not an image", []msg{visionChunk(0, 1, base64.StdEncoding.EncodeToString([]byte("plain text, no picture")), "e", "p")}, "not an image"},
		{"timeout", []msg{visionChunk(0, 2, "AAAA", "f", "p")}, "timed out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, m := range tt.msgs {
				c.send(m)
			}
			e, _ := c.until("error")
			if !strings.Contains(e.str("message"), tt.want) {
				t.Errorf("error = %q, want it to mention %q", e.str("message"), tt.want)
			}
		})
	}
	// After all that the connection still works and holds no upload.
	c.send(msg{"type": "ping"})
	c.until("pong")
}

func TestCancelStopsTheQueryAtTheWorker(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("slow", demo.WithDelay(50*time.Millisecond))))
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, sw)
	c := h.mustDial()
	c.hello()
	c.send(msg{"type": "submit_query", "query_id": "my-query-1", "query": msg{
		"prompt": strings.Repeat("word ", 400), "query_type": "chat", "model_type": "worker_node", "model_name": "demo"}})
	chunk, _ := c.until("query_chunk")
	if chunk.str("query_id") != "my-query-1" {
		t.Fatalf("chunk query_id = %q, want the client's", chunk.str("query_id"))
	}
	c.send(msg{"type": "cancel", "query_id": "my-query-1"})
	e, before := c.until("error")
	if e.str("code") != "CANCELLED" || e.str("query_id") != "my-query-1" {
		t.Errorf("error = %v, want CANCELLED for my-query-1", e)
	}
	for _, m := range before {
		if m.str("type") == "query_result" {
			t.Errorf("a cancelled query produced a result")
		}
	}
	deadline := time.Now().Add(waitLimit)
	for sw.Cancelled() != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if sw.Cancelled() != 1 || sw.InFlight() != 0 {
		t.Errorf("worker saw %d cancellations, %d in flight; want 1, 0", sw.Cancelled(), sw.InFlight())
	}
	// Cancelling it again is an error, not a crash.
	c.send(msg{"type": "cancel", "query_id": "my-query-1"})
	if e, _ := c.until("error"); !strings.Contains(e.str("message"), "no running query") {
		t.Errorf("second cancel: %v", e)
	}
}

func TestQueriesPerConnectionAreBounded(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("slow", demo.WithDelay(50*time.Millisecond))))
	if err != nil {
		t.Fatal(err)
	}
	c := newHarness(t, sw, ws.WithMaxQueries(1)).mustDial()
	c.hello()
	long := strings.Repeat("word ", 400)
	for _, id := range []string{"q1", "q2", "q3"} {
		c.send(msg{"type": "submit_query", "query_id": id, "query": msg{"prompt": long, "query_type": "chat", "model_name": "demo"}})
	}
	// One of q1 and q2 runs, the other waits (queue_update depth 1), q3 is
	// refused.
	var waited, refused bool
	for !(waited && refused) {
		m, err := c.read()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case m.str("type") == "queue_update" && m.str("query_id") != "" && m["depth"] == float64(1):
			waited = true
		case m.str("type") == "error" && m.str("query_id") == "q3":
			if m.str("code") != "BUSY" {
				t.Errorf("q3 refused with %v, want BUSY", m)
			}
			refused = true
		case m.str("type") == "error":
			t.Fatalf("unexpected error %v", m)
		}
	}
	if sw.InFlight() > 1 {
		t.Errorf("%d queries ran at once, limit 1", sw.InFlight())
	}
	c.send(msg{"type": "cancel", "query_id": "q1"})
	c.send(msg{"type": "cancel", "query_id": "q2"})
}

func TestOversizedMessageClosesTheConnection(t *testing.T) {
	c := newHarness(t, nil, ws.WithMaxMessage(1024)).mustDial()
	c.hello()
	c.send(submit(strings.Repeat("x", 4096), "chat", "demo"))
	for {
		_, err := c.read()
		if err == nil {
			continue
		}
		if st := websocket.CloseStatus(err); st != websocket.StatusMessageTooBig {
			t.Errorf("closed with %v (%v), want 1009 message too big", st, err)
		}
		return
	}
}

func TestOriginCheck(t *testing.T) {
	h := newHarness(t, nil, ws.WithAllowedOrigins([]string{"good.example", "https://app.example"}))
	host := strings.TrimPrefix(h.http.URL, "http://")
	tests := []struct {
		origin string
		ok     bool
	}{
		{"", true}, // not a browser
		{"http://" + host, true},
		{"http://good.example", true},
		{"https://app.example", true},
		{"http://app.example", false},
		{"http://evil.example", false},
		{"null", false},
	}
	for _, tt := range tests {
		t.Run(tt.origin, func(t *testing.T) {
			hdr := http.Header{}
			if tt.origin != "" {
				hdr.Set("Origin", tt.origin)
			}
			c, resp, err := h.dial(hdr, "")
			if tt.ok {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				c.hello()
				return
			}
			if err == nil {
				t.Fatalf("origin %q was let in", tt.origin)
			}
			if resp == nil || resp.StatusCode != http.StatusForbidden {
				t.Errorf("origin %q: response %v, want 403", tt.origin, resp)
			}
		})
	}
}

func TestRateLimit(t *testing.T) {
	c := newHarness(t, nil, ws.WithRateLimit(0.1, 5)).mustDial()
	c.hello()
	for i := 0; i < 10; i++ {
		c.send(msg{"type": "ping"})
	}
	pongs, limited := 0, 0
	for pongs+limited < 10 {
		m, err := c.read()
		if err != nil {
			t.Fatal(err)
		}
		switch m.str("type") {
		case "pong":
			pongs++
		case "error":
			if m.str("code") != "RATE_LIMITED" {
				t.Fatalf("error %v", m)
			}
			limited++
		}
	}
	if pongs > 6 || limited < 4 {
		t.Errorf("%d pongs and %d rate-limit errors for 10 pings with burst 5", pongs, limited)
	}
	// A client that keeps flooding is disconnected.
	for i := 0; i < 64; i++ {
		if err := c.c.Write(c.ctx, websocket.MessageText, []byte(`{"type":"ping"}`)); err != nil {
			break
		}
	}
	for {
		if _, err := c.read(); err != nil {
			if st := websocket.CloseStatus(err); st != websocket.StatusPolicyViolation {
				t.Errorf("flooding client closed with %v (%v), want 1008", st, err)
			}
			return
		}
	}
}

func TestSlowReaderIsDroppedWithBoundedMemory(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("fast", demo.WithDelay(0))))
	if err != nil {
		t.Fatal(err)
	}
	const bufBytes = 256 << 10
	h := newHarness(t, sw, ws.WithSendBuffer(64), ws.WithSendBufferBytes(bufBytes))
	c := h.mustDial()
	c.hello()
	// An answer of a million words, streamed as that many query_chunk
	// messages (about 60 MB, far more than the kernel's socket buffers
	// hold), to a client that never reads again.
	c.send(submit(strings.Repeat("a ", 1_000_000), "chat", "demo"))
	deadline := time.Now().Add(waitLimit)
	for h.srv.Connections() != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := h.srv.Connections(); n != 0 {
		t.Fatalf("slow reader still connected (%d connections)", n)
	}
	if q := h.srv.MaxQueuedBytes(); q > bufBytes {
		t.Errorf("queued %d bytes for the slow reader, bound %d", q, bufBytes)
	}
	for sw.InFlight() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if sw.Cancelled() != 1 {
		t.Errorf("the dropped client's query was not cancelled at the worker (%d cancellations)", sw.Cancelled())
	}
}

func TestPingNicknameAndHistory(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	c.send(msg{"type": "ping"})
	c.until("pong")
	c.send(msg{"type": "set_nickname", "nickname": "ada"})
	info, _ := c.until("user_info")
	if info["data"].(map[string]any)["nickname"] != "ada" {
		t.Errorf("user_info after set_nickname = %v", info)
	}
	c.send(msg{"type": "set_nickname", "nickname": strings.Repeat("n", 100)})
	c.until("error")

	c.send(msg{"type": "get_previous_queries"})
	prev, _ := c.until("previous_queries")
	if d, _ := prev["data"].([]any); len(d) != 0 {
		t.Errorf("new connection has history %v", d)
	}
	for i := 0; i < ws.DefaultHistory+2; i++ {
		c.send(submit(fmt.Sprintf("question %d", i), "chat", "demo <b>"))
		c.until("query_done")
	}
	c.send(msg{"type": "get_previous_queries"})
	prev, _ = c.until("previous_queries")
	d, _ := prev["data"].([]any)
	if len(d) != ws.DefaultHistory {
		t.Fatalf("history has %d entries, want the last %d", len(d), ws.DefaultHistory)
	}
	newest := d[0].(map[string]any)
	if newest["prompt"] != fmt.Sprintf("question %d", ws.DefaultHistory+1) || newest["query_type"] != "chat" || newest["model_name"] != "demo" {
		t.Errorf("newest entry = %v", newest)
	}
	for _, k := range []string{"processing_time", "cost"} {
		if _, ok := newest[k].(float64); !ok {
			t.Errorf("%s = %#v, want a number", k, newest[k])
		}
	}
}

func TestTextAnswersAreEscapedForTheSeedClientOnly(t *testing.T) {
	h := newHarness(t, nil)
	const evil = `<img src=x onerror="alert(1)">`
	tests := []struct {
		query string
		want  string
	}{
		{"", "You said: &lt;img src=x onerror=\"alert(1)\"&gt;"},
		{"?format=text", "You said: " + evil},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			c, _, err := h.dial(nil, tt.query)
			if err != nil {
				t.Fatal(err)
			}
			c.hello()
			c.send(submit(evil, "chat", "demo"))
			res, before := c.until("query_result")
			if !strings.HasSuffix(res.str("result"), tt.want) {
				t.Errorf("result = %q, want it to end in %q", res.str("result"), tt.want)
			}
			var streamed strings.Builder
			for _, m := range before {
				streamed.WriteString(m.str("text"))
			}
			if !strings.Contains(streamed.String(), evil) {
				t.Errorf("query_chunk text is not the raw answer: %q", streamed.String())
			}
		})
	}
}

func TestSeedSafe(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"a < b & c > d", "a &lt; b &amp; c &gt; d"},
		{"<b>x</b>\n```go\nif a < b {}\n```\nafter <i>", "&lt;b&gt;x&lt;/b&gt;\n```go\nif a < b {}\n```\nafter &lt;i&gt;"},
		{"```\n<raw>\n``` and ```unterminated <x>", "```\n<raw>\n``` and ```unterminated &lt;x&gt;"},
	}
	for _, tt := range tests {
		if got := ws.SeedSafe(tt.in); got != tt.want {
			t.Errorf("SeedSafe(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestWorkerUpdatePushedWhenModelsChange(t *testing.T) {
	h := newHarness(t, nil, ws.WithModelPoll(20*time.Millisecond))
	c := h.mustDial()
	c.hello()
	h.swarm.AddBackend(demo.New("second", demo.WithModel("second-model")))
	for {
		m, _ := c.until("worker_update")
		if strings.Contains(fmt.Sprint(m["workers"]), "second-model") {
			return
		}
	}
}

func TestBadInput(t *testing.T) {
	c := newHarness(t, nil).mustDial()
	c.hello()
	tests := []struct {
		name string
		raw  string
		want string
	}{
		{"not JSON", `{"type":`, "not valid JSON"},
		{"no type", `{}`, "no type"},
		{"unknown type", `{"type":"add_worker","worker":{}}`, "Unknown message type"},
		{"submit without query", `{"type":"submit_query"}`, "needs a query"},
		{"wrong field type", `{"type":"vision_chunk","chunk_id":"zero","total_chunks":1}`, `"chunk_id" must be int`},
		{"unknown query type", `{"type":"submit_query","query":{"prompt":"x","query_type":"telepathy"}}`, "unknown query_type"},
		{"embed over ws", `{"type":"submit_query","query":{"prompt":"x","query_type":"embed"}}`, "/v1/embeddings"},
		{"empty prompt", `{"type":"submit_query","query":{"prompt":"  ","query_type":"chat","model_name":"demo"}}`, "needs a prompt"},
		{"bad audio", `{"type":"speech_to_text","audio":"%%%"}`, "not valid base64"},
		{"vision without image", `{"type":"submit_query","query":{"prompt":"x","query_type":"vision"}}`, "needs an image"},
		{"bad query id", `{"type":"submit_query","query_id":"a b","query":{"prompt":"x"}}`, "query_id must be"},
		{"bad history role", `{"type":"submit_query","query":{"prompt":"x","history":[{"role":"wizard","content":"y"}]}}`, "role must be"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := c.c.Write(c.ctx, websocket.MessageText, []byte(tt.raw)); err != nil {
				t.Fatal(err)
			}
			e, _ := c.until("error")
			if !strings.Contains(e.str("message"), tt.want) {
				t.Errorf("error = %q, want it to mention %q", e.str("message"), tt.want)
			}
		})
	}
	if err := c.c.Write(c.ctx, websocket.MessageBinary, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if e, _ := c.until("error"); !strings.Contains(e.str("message"), "binary") {
		t.Errorf("binary message: %v", e)
	}
}

func TestCloseDisconnectsClients(t *testing.T) {
	h := newHarness(t, nil)
	c := h.mustDial()
	c.hello()
	h.srv.Close()
	for {
		if _, err := c.read(); err != nil {
			if st := websocket.CloseStatus(err); st != websocket.StatusGoingAway && !errors.Is(err, net.ErrClosed) {
				t.Errorf("closed with %v (%v), want 1001", st, err)
			}
			break
		}
	}
	if _, resp, err := h.dial(nil, ""); err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("dial after Close: %v %v, want 503", resp, err)
	}
}

// TestReadingClientKeepsABurst: an answer whose chunks come faster than
// the writes leave (an instant backend: thousands of chunks, many times
// the send queue) reaches a client that reads all of it, whole and in
// order, ending in query_result and query_done; the queue bound slows the
// answer down rather than drop a client that keeps reading.
func TestReadingClientKeepsABurst(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("fast", demo.WithDelay(0))))
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, sw, ws.WithSendBuffer(16), ws.WithSendBufferBytes(16<<10))
	c := h.mustDial()
	c.hello()
	prompt := strings.TrimSpace(strings.Repeat("word ", 3000))
	c.send(submit(prompt, "chat", "demo"))
	res, before := c.until("query_result")
	var streamed strings.Builder
	chunks := 0
	for _, m := range before {
		if m.str("type") == "query_chunk" {
			streamed.WriteString(m.str("text"))
			chunks++
		}
	}
	if chunks < 3000 || res.str("result") != streamed.String() || !strings.HasSuffix(streamed.String(), "word word") {
		t.Fatalf("%d chunks, %d bytes streamed; result of %d bytes", chunks, streamed.Len(), len(res.str("result")))
	}
	c.until("query_done")
	if n := h.srv.Connections(); n != 1 {
		t.Fatalf("%d connections: the reading client was dropped", n)
	}
}

// piecesSwarm is a fake swarm (no worker behind it) whose every answer is
// speech in two pieces, as docs/protocol.md §5.1 lets a worker send it,
// the second of type second (audio/mpeg when empty).
type piecesSwarm struct{ second string }

func (s piecesSwarm) Query(_ context.Context, _ *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	second := cmp.Or(s.second, "audio/mpeg")
	for _, m := range []*pb.Media{{Mime: "audio/mpeg", Data: []byte("AAAA")}, {Mime: second, Data: []byte("BBBB")}} {
		if err := h(&pb.Event{Kind: &pb.Event_Media{Media: m}}); err != nil {
			return nil, err
		}
	}
	return &router.Result{Attempts: 1, Done: &pb.Done{}}, nil
}
func (piecesSwarm) Peers() []router.PeerView { return nil }
func (piecesSwarm) Models() []router.ModelView {
	return []router.ModelView{{Name: "voice", Types: []string{"tts"}, Peers: 1}}
}

// TestSpeechInPieces: speech that comes in pieces reaches the client
// joined, in order; pieces of different types are no one answer.
func TestSpeechInPieces(t *testing.T) {
	c := newHarnessOn(t, piecesSwarm{}).mustDial()
	c.hello()
	c.send(msg{"type": "text_to_speech", "text": "say it"})
	res, _ := c.until("speech_result", "error")
	audio, err := base64.StdEncoding.DecodeString(res.str("audio"))
	if res.str("type") != "speech_result" || err != nil || string(audio) != "AAAABBBB" || res.str("mime") != "audio/mpeg" {
		t.Fatalf("got %v (audio %q, %v), want AAAABBBB as audio/mpeg", res, audio, err)
	}

	c = newHarnessOn(t, piecesSwarm{second: "audio/wav"}).mustDial()
	c.hello()
	c.send(msg{"type": "text_to_speech", "text": "say it"})
	if res, _ := c.until("speech_result", "error"); res.str("type") != "error" || res.str("code") != "TOO_LARGE" {
		t.Fatalf("pieces of two types: %v, want error TOO_LARGE", res)
	}
}

// Drain waits for the queries of every connection, refusing new ones
// meanwhile as UNAVAILABLE (on any connection, also one opened since); it
// returns when the last one ends. (That their answers are written out
// before Close is bridge's TestShutdownGivesWebSocketQueriesTheGrace.)
func TestDrainWaitsForEveryQuery(t *testing.T) {
	sw, err := wstest.New(wstest.WithBackend(demo.New("slow", demo.WithDelay(50*time.Millisecond))))
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, sw)
	long := strings.Repeat("word ", 400) // 20 s at the backend's pace
	clients := []*client{h.mustDial(), h.mustDial()}
	for i, c := range clients {
		c.hello()
		c.send(msg{"type": "submit_query", "query_id": fmt.Sprint("q", i), "query": msg{"prompt": long, "query_type": "chat", "model_name": "demo"}})
		c.until("query_chunk")
	}
	drained := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*waitLimit)
		defer cancel()
		h.srv.Drain(ctx)
		close(drained)
	}()
	for !h.srv.Draining() {
		time.Sleep(time.Millisecond)
	}
	late := h.mustDial()
	late.hello()
	late.send(msg{"type": "submit_query", "query_id": "late", "query": msg{"prompt": "hi", "query_type": "chat", "model_name": "demo"}})
	if e, _ := late.until("error"); e.str("code") != "UNAVAILABLE" {
		t.Fatalf("a query sent while draining: %v, want UNAVAILABLE", e)
	}
	for i, c := range clients {
		c.send(msg{"type": "cancel", "query_id": fmt.Sprint("q", i)})
		if e, _ := c.until("error"); e.str("code") != "CANCELLED" {
			t.Fatalf("q%d: %v, want CANCELLED", i, e)
		}
		if i == 0 {
			select {
			case <-drained:
				t.Fatal("Drain returned while a query of another connection was running")
			default:
			}
		}
	}
	select {
	case <-drained:
	case <-time.After(waitLimit):
		t.Fatal("Drain did not return after the last query ended")
	}
}
