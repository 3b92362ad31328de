package node_test

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// slowStreams is how many slow answers one client streams at once from
// one worker: more than libp2p's per-peer stream limits (about 220 query
// streams), QUIC's 256 streams per connection and yamux's accept backlog
// (256) allow at once.
const slowStreams = 400

// One client (as a bridge carrying many users is) streams hundreds of
// slow answers at once from one worker whose admission is that wide:
// every one is answered, over TCP (yamux) and over QUIC.
func TestManySlowStreamsThroughOneWorker(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []swarmtest.Option
	}{
		{"tcp", nil},
		{"quic", []swarmtest.Option{swarmtest.QUIC()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := append([]swarmtest.Option{swarmtest.Workers(1), swarmtest.Clients(1),
				// 16 tokens 50 ms apart: each answer holds its stream ~0.8 s.
				swarmtest.DemoDelay(50 * time.Millisecond),
				swarmtest.NodeOptions(node.WithMaxConcurrency(slowStreams), node.WithMaxQueue(slowStreams))}, tc.opts...)
			s := swarmtest.New(t, opts...)
			client, w := s.Clients[0], s.Workers[0]
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()

			start := time.Now()
			var wg sync.WaitGroup
			errs := make([]error, slowStreams)
			texts := make([]string, slowStreams)
			peers := make([]peer.ID, slowStreams)
			for i := range slowStreams {
				wg.Add(1)
				go func() {
					defer wg.Done()
					req := chat("demo", "tell me a long story about streams")
					req.Params = &pb.Params{MaxTokens: 16}
					text, res, err := ask(ctx, client, req)
					errs[i], texts[i] = err, text
					if res != nil {
						peers[i] = res.Peer
					}
				}()
			}
			wg.Wait()
			failed := 0
			for i, err := range errs {
				switch {
				case err != nil:
					failed++
					if failed <= 5 {
						t.Errorf("stream %d: %v", i, err)
					}
				case texts[i] == "":
					t.Errorf("stream %d: answered with no text", i)
				case peers[i] != w.ID():
					t.Errorf("stream %d: answered by %s, want the worker", i, peers[i])
				}
			}
			t.Logf("%s: %d slow streams at once, %d failed, in %s", tc.name, slowStreams, failed, time.Since(start).Round(time.Millisecond))
		})
	}
}

// A peer that opens query streams without bound (its own resource
// manager lets it) is refused past the worker's per-peer bound, even on a
// worker whose admission is wide enough for a bridge's hundreds of
// streams; the worker still answers others meanwhile.
func TestUnboundedStreamOpenerIsRefused(t *testing.T) {
	const width = 2 * slowStreams // admission: running + queued
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1),
		swarmtest.NodeOptions(node.WithMaxConcurrency(slowStreams), node.WithMaxQueue(slowStreams)))
	w := s.Workers[0]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bad, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.ResourceManager(&network.NullResourceManager{}))
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	if err := bad.Connect(ctx, peer.AddrInfo{ID: w.ID(), Addrs: w.Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	limit := node.QueryStreamsPerPeer(width)
	tries := 3 * limit
	proto := protocol.QueryProtocol(w.SwarmName())
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var open []network.Stream
	for range tries {
		st, err := bad.NewStream(sctx, w.ID(), proto)
		if err != nil {
			continue
		}
		open = append(open, st)
		// An incomplete frame: the worker waits for the rest (up to its
		// request read timeout), holding the stream.
		_, _ = st.Write([]byte{0x80})
	}
	// Refusals are resets, seen once the worker has handled each stream.
	held := 0
	deadline := time.Now().Add(time.Minute)
	for {
		held = 0
		for _, st := range open {
			_ = st.SetReadDeadline(time.Now().Add(time.Millisecond))
			var b [1]byte
			if _, err := st.Read(b[:]); err != nil && isTimeout(err) {
				held++ // still open at the worker
			}
		}
		if held <= limit || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	heap := int64(m1.HeapInuse) - int64(m0.HeapInuse)
	t.Logf("%d of %d query streams from one peer held open by the worker (bound %d); heap in use %+d KiB (both ends)", held, tries, limit, heap>>10)
	if heap > 256<<20 {
		t.Fatalf("heap grew by %d MiB", heap>>20)
	}
	if held > limit {
		t.Fatalf("the worker holds %d streams of one peer, over its bound %d", held, limit)
	}
	if held < width {
		t.Fatalf("the worker holds only %d streams of one peer, under its admission width %d", held, width)
	}
	if _, err := hostileQuery(ctx, s.Clients[0]); err != nil {
		t.Fatalf("honest query during the flood: %v", err)
	}
	for _, st := range open {
		_ = st.Reset()
	}
}

func isTimeout(err error) bool {
	te, ok := err.(interface{ Timeout() bool })
	return ok && te.Timeout()
}
