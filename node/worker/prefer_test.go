package worker

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func loopbackHost(t *testing.T) host.Host {
	t.Helper()
	return hostOn(t, "/ip4/127.0.0.1/tcp/0")
}

// transports are the default transports, for the tests that run over
// each: a worker host listening on one of them is reached over it.
var transports = []struct{ name, listen string }{
	{"tcp", "/ip4/127.0.0.1/tcp/0"},
	{"quic", "/ip4/127.0.0.1/udp/0/quic-v1"},
}

// hostOn is a host listening on listen, closed with the test.
func hostOn(t *testing.T, listen string, opts ...libp2p.Option) host.Host {
	t.Helper()
	h, err := libp2p.New(append([]libp2p.Option{libp2p.ListenAddrStrings(listen)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// query sends one chat query from h to the worker host and returns when
// its Done arrives.
func query(ctx context.Context, h host.Host, to peer.ID, prompt string) error {
	s, err := h.NewStream(ctx, to, "/mtor/test/query")
	if err != nil {
		return err
	}
	defer s.Close()
	r := req(prompt)
	r.Id[0] = byte(len(prompt))
	if err := protocol.WriteFrame(s, r); err != nil {
		return err
	}
	_ = s.CloseWrite()
	fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
	for {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			return err
		}
		if ev.GetDone() != nil {
			return nil
		}
		if e := ev.GetError(); e != nil {
			return protocol.FromProto(e)
		}
	}
}

// TestPreferContributorsOrdersTheQueue: a busy worker (one slot, taken)
// queues a net consumer's query and then a contributor's. With the
// preference on, the contributor's is answered first although it came
// second; with it off, arrival order holds.
func TestPreferContributorsOrdersTheQueue(t *testing.T) {
	for _, prefer := range []bool{true, false} {
		t.Run(map[bool]string{true: "on", false: "off"}[prefer], func(t *testing.T) {
			wh := loopbackHost(t)
			led, err := ledger.Open("", wh.ID())
			if err != nil {
				t.Fatal(err)
			}
			opts := []Option{WithMaxConcurrency(1), WithSigner(wh.Peerstore().PrivKey(wh.ID())),
				WithOnServed(func(r *pb.Receipt) { led.Record(ledger.Served, r) })}
			if prefer {
				opts = append(opts, WithPreferContributors(led.Balance))
			}
			w := newWorker(t, demo.New("w", demo.WithDelay(20*time.Millisecond)), opts...)
			wh.SetStreamHandler("/mtor/test/query", w.HandleStream)

			blocker, consumer, contributor := loopbackHost(t), loopbackHost(t), loopbackHost(t)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			for _, h := range []host.Host{blocker, consumer, contributor} {
				if err := h.Connect(ctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
					t.Fatal(err)
				}
			}
			// The ledger as real queries make it: the worker answered the
			// consumer (served), and consumed an answer from the
			// contributor (its receipt, as the router records it).
			if err := query(ctx, consumer, wh.ID(), "take take take"); err != nil {
				t.Fatal(err)
			}
			led.Record(ledger.Consumed, &pb.Receipt{QueryId: make([]byte, 16), Model: "demo", TotalMs: 5000,
				CompletionTokens: 50, Worker: []byte(contributor.ID()), Requester: []byte(wh.ID())})
			waitUntil(t, func() bool { return led.Balance(consumer.ID()) < 0 && led.Balance(contributor.ID()) > 0 })

			var mu sync.Mutex
			var order []string
			run := func(h host.Host, name, prompt string) chan error {
				ch := make(chan error, 1)
				go func() {
					err := query(ctx, h, wh.ID(), prompt)
					mu.Lock()
					order = append(order, name)
					mu.Unlock()
					ch <- err
				}()
				return ch
			}
			b := run(blocker, "blocker", strings.Repeat("w ", 40)) // ~0.8 s in the slot
			waitUntil(t, func() bool { r, _, _, _ := w.Load(); return r == 1 })
			c1 := run(consumer, "consumer", "consumer asks")
			waitUntil(t, func() bool { _, q, _, _ := w.Load(); return q == 1 })
			c2 := run(contributor, "contributor", "contributor asks")
			waitUntil(t, func() bool { _, q, _, _ := w.Load(); return q == 2 })
			for _, ch := range []chan error{b, c1, c2} {
				if err := <-ch; err != nil {
					t.Fatal(err)
				}
			}
			want := "blocker,consumer,contributor"
			if prefer {
				want = "blocker,contributor,consumer"
			}
			if got := strings.Join(order, ","); got != want {
				t.Fatalf("answered in order %s, want %s", got, want)
			}
		})
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestServingTellsEachStream: WithServing hears +1 from a peer as its
// query stream starts and -1 once it has been answered, so that the
// node's gossip-link repair can wait for it.
func TestServingTellsEachStream(t *testing.T) {
	var (
		mu    sync.Mutex
		count = map[peer.ID]int{}
		most  int
	)
	wh := loopbackHost(t)
	w := New([]backend.Backend{demo.New("w", demo.WithDelay(50*time.Millisecond))}, WithServing(func(p peer.ID, d int) {
		mu.Lock()
		defer mu.Unlock()
		count[p] += d
		most = max(most, count[p])
	}))
	w.Refresh(t.Context())
	wh.SetStreamHandler("/mtor/test/query", w.HandleStream)
	ch := loopbackHost(t)
	if err := ch.Connect(t.Context(), peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
		t.Fatal(err)
	}
	var asked sync.WaitGroup
	for i := range 3 {
		asked.Go(func() {
			if err := query(t.Context(), ch, wh.ID(), fmt.Sprintf("question %d", i)); err != nil {
				t.Error(err)
			}
		})
	}
	asked.Wait()
	// The stream's end is told after its Done reached the client.
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n, m := count[ch.ID()], most
		mu.Unlock()
		if n == 0 && m == 3 {
			return
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%d streams told as open after all were answered, at most %d at once; want 0 and 3", n, m)
		}
	}
}
