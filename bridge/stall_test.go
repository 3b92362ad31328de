package bridge

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestStalledUploadIsAnswered: a client that declares a body and stops
// sending part way gets 408 once the body's read deadline passes, the
// connection closes (net/http does not wait on to discard the rest of
// the body), and the body's share of the budget comes back: for a JSON
// body and for a multipart upload.
func TestStalledUploadIsAnswered(t *testing.T) {
	for _, tc := range []struct{ name, path, ctype, start string }{
		{"json", "/v1/chat/completions", "application/json", `{"model":`},
		{"multipart", "/v1/audio/transcriptions", "multipart/form-data; boundary=X",
			"--X\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhis"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := New(&fakeSwarm{}, WithRegistry(prometheus.NewRegistry()))
			if err != nil {
				t.Fatal(err)
			}
			b.cfg.bodyTimeout = 300 * time.Millisecond
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() { _ = b.Serve(ctx, ln) }()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n%s", tc.path, tc.ctype, tc.start); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			br := bufio.NewReader(c)
			status, err := br.ReadString('\n')
			if err != nil || !strings.HasPrefix(status, "HTTP/1.1 408") {
				t.Fatalf("status %q, %v: want 408", status, err)
			}
			rest, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("after the answer: %v, want the connection closed", err)
			}
			if !strings.Contains(string(rest), "request_timeout") || strings.Contains(string(rest), "127.0.0.1") {
				t.Errorf("answer %q: want request_timeout, and no address", rest)
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
