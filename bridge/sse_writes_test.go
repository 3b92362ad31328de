package bridge

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
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

// stallListener's connections act as a client that stopped reading, once
// stall is set: a write with a deadline fails as that deadline would, a
// write without one blocks until the test ends, as it would for good.
type stallListener struct {
	net.Listener
	stall   atomic.Bool
	giveUp  chan struct{}
	closedC chan struct{}
}

func (l *stallListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &stallConn{Conn: c, l: l}, nil
}

type stallConn struct {
	net.Conn
	l    *stallListener
	mu   sync.Mutex
	dl   time.Time
	once sync.Once
}

func (c *stallConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.dl = t
	c.mu.Unlock()
	return c.Conn.SetWriteDeadline(t)
}

func (c *stallConn) Write(b []byte) (int, error) {
	if c.l.stall.Load() {
		c.mu.Lock()
		dl := c.dl
		c.mu.Unlock()
		if !dl.IsZero() {
			return 0, os.ErrDeadlineExceeded
		}
		<-c.l.giveUp
		return 0, net.ErrClosed
	}
	return c.Conn.Write(b)
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.l.closedC) })
	return c.Conn.Close()
}

// gatedSwarm answers with one chunk, then waits for release before its
// Done.
type gatedSwarm struct {
	fakeSwarm
	release chan struct{}
}

func (g *gatedSwarm) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	if err := h(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "first"}}}); err != nil {
		return nil, err
	}
	select {
	case <-g.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &router.Result{Attempts: 1, Done: &pb.Done{}}, nil
}

// TestHeldTailHasAWriteDeadline: a streamed answer's last events, which
// net/http writes after the handler returns, are under a write deadline
// too: a client that stops reading just before them costs the bridge its
// connection, not a goroutine and a socket for good.
func TestHeldTailHasAWriteDeadline(t *testing.T) {
	g := &gatedSwarm{release: make(chan struct{})}
	b, err := New(g, WithRegistry(prometheus.NewRegistry()))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sl := &stallListener{Listener: ln, giveUp: make(chan struct{}), closedC: make(chan struct{})}
	defer close(sl.giveUp)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = b.Serve(ctx, sl) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := `{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	if _, err := fmt.Fprintf(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(testTimeout))
	br := bufio.NewReader(c)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the stream: %v", err)
		}
		if strings.Contains(line, `"first"`) {
			break
		}
	}
	sl.stall.Store(true) // the client reads no more
	close(g.release)
	select {
	case <-sl.closedC:
	case <-time.After(10 * time.Second): // at once with the deadline

		t.Fatal("the bridge still holds the connection: the answer's end was written without a deadline")
	}
}
