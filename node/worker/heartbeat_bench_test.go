package worker_test

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-varint"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// silent is a backend that produces nothing until its query is cancelled:
// a model still reading a long prompt, as far as the stream can tell.
type silent struct{}

func (silent) Kind() string { return "silent" }
func (silent) Name() string {
	return "silent (benchmark stand-in for a model that has not answered yet)"
}
func (silent) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: "m", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}}}, nil
}
func (silent) Probe(context.Context) error { return nil }
func (silent) Run(ctx context.Context, _ *pb.QueryRequest, _ backend.Sink) (backend.Usage, error) {
	<-ctx.Done()
	return backend.Usage{}, ctx.Err()
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkHeartbeatCost measures what heartbeats cost: 250 query
// streams over real libp2p connections whose backend stays silent, so the
// worker's heartbeats are all that crosses them, for one window each, at
// the 1 s heartbeat against the 5 s one of protocol v1. It reports the
// process's CPU (client and worker together) per second and the bytes the
// client read per stream per second.
//
//	go test ./node/worker -run '^$' -bench HeartbeatCost -benchtime 1x
func BenchmarkHeartbeatCost(b *testing.B) {
	// 250: QUIC allows 256 concurrent streams per connection in go-libp2p.
	const streams = 250
	const window = 5 * time.Second
	for _, tr := range []struct{ name, listen string }{
		{"tcp", "/ip4/127.0.0.1/tcp/0"},
		{"quic", "/ip4/127.0.0.1/udp/0/quic-v1"},
	} {
		for _, beat := range []time.Duration{time.Second, protocol.LegacyHeartbeat} {
			b.Run(fmt.Sprintf("%s/beat=%s", tr.name, beat), func(b *testing.B) {
				for range b.N {
					cpu, bytes := heartbeatWindow(b, tr.listen, beat, streams, window)
					b.ReportMetric(float64(cpu.Milliseconds())/window.Seconds(), "cpu-ms/s")
					b.ReportMetric(float64(bytes)/streams/window.Seconds(), "B/s/stream")
				}
			})
		}
	}
}

func heartbeatWindow(b *testing.B, listen string, beat time.Duration, streams int, window time.Duration) (time.Duration, int64) {
	b.Helper()
	mk := func() host.Host {
		h, err := libp2p.New(libp2p.ListenAddrStrings(listen), libp2p.ResourceManager(&network.NullResourceManager{}))
		if err != nil {
			b.Fatal(err)
		}
		return h
	}
	wh, ch := mk(), mk()
	defer wh.Close()
	defer ch.Close()
	w := worker.New([]backend.Backend{silent{}}, worker.WithMaxConcurrency(streams), worker.WithHeartbeat(beat))
	w.Refresh(context.Background())
	wh.SetStreamHandler("/bench", w.HandleStream)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := ch.Connect(ctx, peer.AddrInfo{ID: wh.ID(), Addrs: wh.Addrs()}); err != nil {
		b.Fatal(err)
	}
	counts := make(chan int64, streams)
	start := make(chan struct{})
	for range streams {
		s, err := ch.NewStream(ctx, wh.ID(), "/bench")
		if err != nil {
			b.Fatal(err)
		}
		req := &pb.QueryRequest{Id: make([]byte, protocol.IDLen), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m", Prompt: "hi"}
		if err := protocol.WriteFrame(s, req); err != nil {
			b.Fatal(err)
		}
		_ = s.CloseWrite()
		go func() {
			defer s.Reset()
			fr := protocol.NewFrameReader(s, protocol.MaxEventFrame)
			var ev pb.Event
			if fr.Read(&ev) != nil { // the first Accepted
				counts <- 0
				return
			}
			<-start
			var n int64
			end := time.Now().Add(window)
			for {
				_ = s.SetReadDeadline(end)
				var ev pb.Event
				if err := fr.Read(&ev); err != nil {
					break
				}
				sz := proto.Size(&ev)
				n += int64(sz + varint.UvarintSize(uint64(sz)))
			}
			counts <- n
		}()
	}
	time.Sleep(200 * time.Millisecond) // all accepted
	c0 := cpuTime()
	close(start)
	var total int64
	for range streams {
		total += <-counts
	}
	return cpuTime() - c0, total
}
