package bridge

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// recordingListener keeps what each write of its connections carried.
type recordingListener struct {
	net.Listener
	mu     sync.Mutex
	writes [][]byte
}

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &recordingConn{Conn: c, l: l}, nil
}

type recordingConn struct {
	net.Conn
	l *recordingListener
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.l.mu.Lock()
	c.l.writes = append(c.l.writes, bytes.Clone(b))
	c.l.mu.Unlock()
	return c.Conn.Write(b)
}

// TestStreamEndsInOneWrite: the answer's last events, [DONE] and the end
// of the chunked body (with the peer trailer) leave in one write, not one
// flush each.
func TestStreamEndsInOneWrite(t *testing.T) {
	b, err := New(newLocalSwarm(t), WithRegistry(prometheus.NewRegistry()))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rl := &recordingListener{Listener: ln}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Serve(ctx, rl) }()
	defer func() {
		cancel()
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	}()
	reqCtx, reqCancel := context.WithTimeout(context.Background(), testTimeout)
	defer reqCancel()
	req, err := http.NewRequestWithContext(reqCtx, http.MethodPost, "http://"+ln.Addr().String()+"/v1/chat/completions",
		strings.NewReader(`{"model":"demo","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.HasSuffix(body, []byte("data: [DONE]\n\n")) {
		t.Fatalf("status %d, err %v, body %q", resp.StatusCode, err, body)
	}
	if resp.Trailer.Get(peerHeader) == "" {
		t.Fatalf("no %s trailer", peerHeader)
	}
	rl.mu.Lock()
	defer rl.mu.Unlock()
	for i, w := range rl.writes {
		if !bytes.Contains(w, []byte(`"finish_reason":"stop"`)) {
			continue
		}
		if i != len(rl.writes)-1 || !bytes.Contains(w, []byte(`"usage":{`)) || !bytes.Contains(w, []byte("data: [DONE]\n\n")) ||
			!bytes.Contains(w, []byte("\r\n0\r\n")) {
			t.Fatalf("the finish event is in write %d of %d, not one last write with usage, [DONE] and the body's end: %q", i+1, len(rl.writes), w)
		}
		return
	}
	t.Fatalf("no write carried the finish event; writes: %q", rl.writes)
}
