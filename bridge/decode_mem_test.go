package bridge

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"runtime"
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
