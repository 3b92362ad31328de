package protocol_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func chunkEvent(s string) *pb.Event {
	return &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: s}}}
}

// TestFrameWriterKeepsFramesWholeAndInOrder: however the writes batch,
// the reader sees each frame whole, in the order written.
func TestFrameWriterKeepsFramesWholeAndInOrder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frames int
		size   int
	}{
		{"one token", 1, 3},
		{"many small tokens", 5000, 3},
		{"frames over the pending bound", 40, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			defer b.Close()
			fw := protocol.NewFrameWriter(a, a.SetWriteDeadline, 10*time.Second)
			errc := make(chan error, 1)
			go func() {
				for i := range tc.frames {
					text := fmt.Sprintf("%0*d", tc.size, i)
					if err := fw.Write(chunkEvent(text)); err != nil {
						errc <- err
						return
					}
				}
				errc <- fw.Close()
			}()
			fr := protocol.NewFrameReader(b, protocol.MaxEventFrame)
			for i := range tc.frames {
				var ev pb.Event
				if err := fr.Read(&ev); err != nil {
					t.Fatalf("frame %d: %v", i, err)
				}
				if want := fmt.Sprintf("%0*d", tc.size, i); ev.GetChunk().GetText() != want {
					t.Fatalf("frame %d: %.20q, want %.20q", i, ev.GetChunk().GetText(), want)
				}
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestFrameWriterReportsAGoneReader: a reader that stops reading fails the
// writes within the write timeout (the queue is bounded, so Write blocks
// rather than buffering without end), and Write after Close is refused.
func TestFrameWriterReportsAGoneReader(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	fw := protocol.NewFrameWriter(a, a.SetWriteDeadline, 200*time.Millisecond)
	var err error
	for i := 0; i < 1000 && err == nil; i++ {
		err = fw.Write(chunkEvent(fmt.Sprintf("%01000d", i)))
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write to a reader that never reads: %v, want a deadline error", err)
	}
	if err := fw.Close(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Close: %v, want the write's error", err)
	}
	fw2 := protocol.NewFrameWriter(io.Discard, nil, time.Second)
	if err := fw2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fw2.Write(chunkEvent("late")); !errors.Is(err, protocol.ErrWriterClosed) {
		t.Fatalf("Write after Close: %v, want ErrWriterClosed", err)
	}
}

// BenchmarkAppendFrame frames one token's Chunk event into a reused
// buffer, as the worker's FrameWriter does per token.
func BenchmarkAppendFrame(b *testing.B) {
	ev := chunkEvent("zq ")
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		var err error
		if buf, err = protocol.AppendFrame(buf[:0], ev); err != nil {
			b.Fatal(err)
		}
	}
}
