package coalesce

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/muxer/yamux"
)

// counting counts the writes that reach a connection, and says on entered
// (when set) that one has begun.
type counting struct {
	net.Conn
	writes  atomic.Int64
	entered chan struct{}
}

func (c *counting) Write(p []byte) (int, error) {
	c.writes.Add(1)
	if c.entered != nil {
		select {
		case c.entered <- struct{}{}:
		default:
		}
	}
	return c.Conn.Write(p)
}

// readN reads n bytes from r, or fails the test.
func readN(t *testing.T, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// Frames written while the connection is busy with an earlier one go out
// together, in order, in one write; a frame written to an idle connection
// goes at once, alone.
func TestWritesWhileBusyGoTogether(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frames int // written while the first is stuck
		size   int
	}{
		{"one behind", 1, 30},
		{"many small", 50, 30},
		{"a few large", 3, 10 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer b.Close()
			cnt := &counting{Conn: a, entered: make(chan struct{}, 1)}
			c := New(cnt)
			defer c.Close()
			// net.Pipe's Write waits for the reader: the first frame
			// holds the flusher until the test reads.
			first := bytes.Repeat([]byte{0xff}, 10)
			if _, err := c.Write(first); err != nil {
				t.Fatal(err)
			}
			<-cnt.entered
			var want []byte
			queued := make(chan error, 1)
			go func() {
				for i := range tc.frames {
					f := bytes.Repeat([]byte{byte(i)}, tc.size)
					want = append(want, f...)
					if _, err := c.Write(f); err != nil {
						queued <- err
						return
					}
				}
				queued <- nil
			}()
			select {
			case err := <-queued:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("a write waited for the busy connection instead of queueing")
			}
			if got := readN(t, b, len(first)); !bytes.Equal(got, first) {
				t.Fatalf("first frame %x", got)
			}
			if got := readN(t, b, len(want)); !bytes.Equal(got, want) {
				t.Fatal("the frames behind it came out changed or out of order")
			}
			if n := cnt.writes.Load(); n != 2 {
				t.Fatalf("%d writes for a frame and %d behind it, want 2", n, tc.frames)
			}
			// Idle again: the next frame goes at once, alone.
			if _, err := c.Write([]byte("next")); err != nil {
				t.Fatal(err)
			}
			if got := readN(t, b, 4); string(got) != "next" {
				t.Fatalf("got %q", got)
			}
			if n := cnt.writes.Load(); n != 3 {
				t.Fatalf("%d writes, want 3", n)
			}
		})
	}
}

// A writer waits once MaxPending bytes are queued, and goes on when the
// peer reads.
func TestPendingBounded(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := New(a)
	defer c.Close()
	if _, err := c.Write([]byte{1}); err != nil { // holds the flusher
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, MaxPending)); err != nil { // fills the queue
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := c.Write([]byte{2})
		wrote <- err
	}()
	select {
	case err := <-wrote:
		t.Fatalf("a write beyond %d queued bytes returned at once (%v)", MaxPending, err)
	case <-time.After(200 * time.Millisecond):
	}
	readN(t, b, 1+MaxPending)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if got := readN(t, b, 1); got[0] != 2 {
		t.Fatalf("last byte %d", got[0])
	}
}

// failing is a connection whose writes fail.
type failing struct {
	net.Conn
	closed atomic.Bool
}

var errBroken = errors.New("broken pipe (test)")

func (f *failing) Write([]byte) (int, error) { return 0, errBroken }
func (f *failing) Close() error              { f.closed.Store(true); return nil }

// After a failed write, every later Write returns its error, and the
// connection is closed, so that its reader stops too.
func TestFailedWriteFailsLaterWrites(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	f := &failing{Conn: a}
	c := New(f)
	if _, err := c.Write([]byte("lost")); err != nil {
		t.Fatalf("first write: %v (it is only queued)", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Write([]byte("after"))
		if errors.Is(err, errBroken) {
			break
		}
		if err != nil || time.Now().After(deadline) {
			t.Fatalf("write after the failure: %v, want %v", err, errBroken)
		}
		time.Sleep(time.Millisecond)
	}
	if !f.closed.Load() {
		t.Fatal("the connection was not closed after a failed write")
	}
}

// Close writes what is pending; when the peer reads nothing, it gives up
// after closeFlushLimit, and a connection that ignores its write deadline
// is closed all the same. Either way later writes fail.
func TestCloseFlushesPending(t *testing.T) {
	for _, tc := range []struct {
		name   string
		read   bool
		ignore bool // the connection ignores write deadlines
	}{
		{"peer reads", true, false},
		{"peer stuck", false, false},
		{"peer stuck, deadlines ignored", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer b.Close()
			var under net.Conn = a
			if tc.ignore {
				under = noDeadlines{a}
			}
			c := New(under)
			got := make(chan []byte, 1)
			if tc.read {
				go func() {
					buf, _ := io.ReadAll(b)
					got <- buf
				}()
			}
			msg := []byte("goodbye")
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			closed := make(chan error, 1)
			go func() { closed <- c.Close() }()
			select {
			case <-closed:
			case <-time.After(closeFlushLimit + 10*time.Second):
				t.Fatal("Close did not return")
			}
			if tc.read {
				if buf := <-got; !bytes.Equal(buf, msg) {
					t.Fatalf("the peer read %q before the close, want %q", buf, msg)
				}
			} else if _, err := b.Read(make([]byte, 1)); err == nil {
				t.Fatal("the peer could still read after Close gave up")
			}
			if _, err := c.Write([]byte("late")); err == nil {
				t.Fatal("a write after Close succeeded")
			}
		})
	}
}

// noDeadlines is a connection that ignores write deadlines.
type noDeadlines struct{ net.Conn }

func (noDeadlines) SetWriteDeadline(time.Time) error { return nil }

// A frame is written under the deadline set when it was queued: a caller
// that keeps writing and moving its deadline on (as yamux's send loop
// does) does not keep a write to a peer that reads nothing alive; the
// write fails, and every Write after it.
func TestDeadlineOfTheOldestFrame(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := New(a)
	defer c.Close()
	start := time.Now()
	_ = c.SetWriteDeadline(start.Add(200 * time.Millisecond))
	if _, err := c.Write([]byte("stuck")); err != nil {
		t.Fatal(err)
	}
	for time.Since(start) < 10*time.Second {
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write: %v, want a deadline exceeded", err)
			}
			t.Logf("the write failed %s after the first frame", time.Since(start).Round(time.Millisecond))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("writes kept succeeding for 10 s: the later deadlines kept the stuck write alive")
}

// countingMuxer is Muxer, with the frames yamux writes (above) and the
// writes that reach the secured connection (below) counted.
type countingMuxer struct {
	network.Multiplexer
	mu           sync.Mutex
	above, below []*counting
}

func (m *countingMuxer) NewConn(c net.Conn, isServer bool, scope network.PeerScope) (network.MuxedConn, error) {
	below := &counting{Conn: c}
	above := &counting{Conn: New(below)}
	m.mu.Lock()
	m.above, m.below = append(m.above, above), append(m.below, below)
	m.mu.Unlock()
	return m.Multiplexer.NewConn(above, isServer, scope)
}

func (m *countingMuxer) counts() (frames, writes int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.above {
		frames += m.above[i].writes.Load()
		writes += m.below[i].writes.Load()
	}
	return frames, writes
}

const echo = "/coalesce-test/echo/1"

func newHost(t *testing.T, mux *countingMuxer) host.Host {
	t.Helper()
	h, err := libp2p.New(
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.Muxer(yamux.ID, mux),
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	h.SetStreamHandler(echo, func(s network.Stream) {
		defer s.Close()
		_ = s.SetDeadline(time.Now().Add(time.Minute))
		_, _ = io.Copy(s, s)
	})
	return h
}

// Over real libp2p hosts (TCP, noise, yamux): many streams at once, each
// echoing data of its own length, all arrive whole and in order, with
// fewer writes on the connection than frames yamux wrote.
func TestStreamsOverACoalescedConnection(t *testing.T) {
	mux := &countingMuxer{Multiplexer: yamux.DefaultTransport}
	ha, hb := newHost(t, mux), newHost(t, mux)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := ha.Connect(ctx, peer.AddrInfo{ID: hb.ID(), Addrs: hb.Addrs()}); err != nil {
		t.Fatal(err)
	}
	const streams = 64
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Go(func() {
			s, err := ha.NewStream(ctx, hb.ID(), echo)
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			_ = s.SetDeadline(time.Now().Add(time.Minute))
			data := make([]byte, 1+rand.IntN(64<<10))
			for j := range data {
				data[j] = byte(i + j)
			}
			go func() {
				// Small writes, as a query's events are.
				for off := 0; off < len(data); off += 300 {
					if _, err := s.Write(data[off:min(off+300, len(data))]); err != nil {
						return
					}
				}
				_ = s.CloseWrite()
			}()
			got, err := io.ReadAll(s)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, data) {
				errs <- fmt.Errorf("stream %d: %d bytes back of %d, or changed", i, len(got), len(data))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	frames, writes := mux.counts()
	t.Logf("%d writes on the connection for %d frames of %d streams", writes, frames, streams)
	if writes == 0 || writes >= frames {
		t.Fatalf("%d writes for %d frames: nothing went together", writes, frames)
	}
}

// An empty write queues nothing and starts no flusher.
func TestEmptyWrite(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	c := New(a)
	defer c.Close()
	if n, err := c.Write(nil); n != 0 || err != nil {
		t.Fatalf("Write(nil) = %d, %v", n, err)
	}
	c.mu.Lock()
	flushing, queued := c.flushing, len(c.pending)
	c.mu.Unlock()
	if flushing || queued != 0 {
		t.Fatalf("after an empty write: flushing %v, %d bytes queued", flushing, queued)
	}
}
