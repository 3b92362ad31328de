package bridge

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestStalledUploadIsAnswered: a client that declares a body and stops
// sending part way gets 408 once the body's read deadline passes, the
// connection closes (net/http does not wait on to discard the rest of
// the body), and the body's share of the budget comes back: for a JSON
// body and for a multipart upload.
func TestStalledUploadIsAnswered(t *testing.T) {
	shortBodyTimeout := func(c *config) error { c.bodyTimeout = 300 * time.Millisecond; return nil }
	for _, tc := range []struct{ name, path, ctype, start string }{
		{"json", "/v1/chat/completions", "application/json", `{"model":`},
		{"multipart", "/v1/audio/transcriptions", "multipart/form-data; boundary=X",
			"--X\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhis"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, base := startBridge(t, &fakeSwarm{}, shortBodyTimeout)
			_, br := rawRequest(t, base, http.MethodPost, tc.path, tc.ctype, 100000, []byte(tc.start))
			resp, err := http.ReadResponse(br, nil)
			if err != nil || resp.StatusCode != http.StatusRequestTimeout {
				t.Fatalf("answer %v, %v: want 408", resp, err)
			}
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(body), "request_timeout") || strings.Contains(string(body), "127.0.0.1") {
				t.Errorf("answer %q: want request_timeout, and no address", body)
			}
			if _, err := br.ReadByte(); err != io.EOF {
				t.Fatalf("after the answer: %v, want the connection closed", err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for b.bodies.inUse() != 0 {
				if time.Now().After(deadline) {
					t.Fatalf("%d bytes of the body budget still held", b.bodies.inUse())
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
