package bridge

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestLargeImageDecodedOnce: reading and translating a chat body that
// carries a 6 MiB image (8 MiB of base64) allocates the body twice (its
// buffer, and the smaller ones it grew from as the bytes came) and the
// image once, and little else. Decoding through a streaming json.Decoder
// and raw JSON, as the bridge did, allocated about six times the body.
func TestLargeImageDecodedOnce(t *testing.T) {
	const img = 6 << 20
	body := []byte(`{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what is it?"},{"type":"image_url","image_url":{"url":"` +
		dataURL("image/png", img) + `"}}]}]}`)
	r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var req chatRequest
	if aerr := decodeJSON(w, r, DefaultMaxBody, time.Minute, &req); aerr != nil {
		t.Fatal(aerr)
	}
	q, aerr := chatToQuery(&req, limits{maxMedia: DefaultMaxMedia})
	runtime.ReadMemStats(&after)
	if aerr != nil {
		t.Fatal(aerr)
	}
	if a := q.Messages[0].Attachments; len(a) != 1 || len(a[0].Data) != img {
		t.Fatalf("attachments %v", a)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	bound := 2*uint64(len(body)) + img + 1<<20
	t.Logf("body %d bytes, image %d bytes: %d bytes allocated (%.2f × the body)", len(body), img, alloc, float64(alloc)/float64(len(body)))
	if alloc > bound {
		t.Errorf("allocated %d bytes, over twice the body plus the image plus 1 MiB (%d)", alloc, bound)
	}
}

// TestJSONErrorSaysWhatIsWrong: a body cut short, data after the value
// and a wrong byte are told apart, a wrong last byte included (the
// decoder's offset points past the failing byte, as it does for a body
// cut short).
func TestJSONErrorSaysWhatIsWrong(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`{"model":"demo"`, "it ends too early"},
		{`{"model":`, "it ends too early"},
		{`{"model":"demo"}x`, "data after the JSON value"},
		{`{"model":"demo"} {}`, "data after the JSON value"},
		{`{"model":"demo",}`, "not valid JSON at byte 17"},
		{`{"model":"demo"x}`, "not valid JSON at byte 16"},
		{`   `, "body is empty"},
	} {
		var v map[string]any
		err := json.Unmarshal([]byte(tc.body), &v)
		if err == nil {
			t.Fatalf("%q decoded", tc.body)
		}
		if got := jsonError([]byte(tc.body), err); !strings.Contains(got.Message, tc.want) {
			t.Errorf("%q: %q, want %q in it", tc.body, got.Message, tc.want)
		}
	}
}
