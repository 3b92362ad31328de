package protocol_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
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

// writeLog records each Write the FrameWriter makes.
type writeLog struct{ writes chan []byte }

func newWriteLog() *writeLog { return &writeLog{writes: make(chan []byte, 16)} }

func (l *writeLog) Write(b []byte) (int, error) {
	l.writes <- append([]byte(nil), b...)
	return len(b), nil
}

func acceptedEvent() *pb.Event {
	return &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{}}}
}

// TestFrameWriterWriteSoon: a frame written with WriteSoon waits for the
// next one and leaves with it in one write; with nothing following it
// leaves alone once its wait is over, or at Close.
func TestFrameWriterWriteSoon(t *testing.T) {
	one, err := protocol.AppendFrame(nil, acceptedEvent())
	if err != nil {
		t.Fatal(err)
	}
	both, err := protocol.AppendFrame(append([]byte(nil), one...), chunkEvent("hi"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		wait  time.Duration
		then  func(*protocol.FrameWriter) error
		want  [][]byte
		after time.Duration // the least time before the first write
	}{
		{"next frame joins it", time.Minute, func(fw *protocol.FrameWriter) error { return fw.Write(chunkEvent("hi")) }, [][]byte{both}, 0},
		{"alone after its wait", 50 * time.Millisecond, func(*protocol.FrameWriter) error { return nil }, [][]byte{one}, 50 * time.Millisecond},
		{"close sends it", time.Minute, (*protocol.FrameWriter).Close, [][]byte{one}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := newWriteLog()
			fw := protocol.NewFrameWriter(l, nil, time.Minute)
			start := time.Now()
			if err := fw.WriteSoon(acceptedEvent(), tc.wait); err != nil {
				t.Fatal(err)
			}
			if err := tc.then(fw); err != nil {
				t.Fatal(err)
			}
			for i, want := range tc.want {
				select {
				case got := <-l.writes:
					if string(got) != string(want) {
						t.Fatalf("write %d: %x, want %x", i, got, want)
					}
				case <-time.After(30 * time.Second):
					t.Fatalf("write %d never came", i)
				}
			}
			if d := time.Since(start); d < tc.after {
				t.Fatalf("first write after %s, before the %s wait was over", d, tc.after)
			}
			if err := fw.Close(); err != nil {
				t.Fatal(err)
			}
			select {
			case got := <-l.writes:
				t.Fatalf("an extra write: %x", got)
			default:
			}
		})
	}
}

// TestFrameWriterMovesItsDeadlineRarely: the write deadline is set once
// for writes within half the timeout of it, not per write.
func TestFrameWriterMovesItsDeadlineRarely(t *testing.T) {
	l := newWriteLog()
	var set []time.Time
	fw := protocol.NewFrameWriter(l, func(d time.Time) error { set = append(set, d); return nil }, time.Hour)
	for i := range 20 {
		if err := fw.Write(chunkEvent("t")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-l.writes: // one write per frame: each waits for the last
		case <-time.After(30 * time.Second):
			t.Fatalf("write %d never came", i)
		}
	}
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	if len(set) != 1 || time.Until(set[0]) < 59*time.Minute {
		t.Fatalf("deadlines set: %v, want one about an hour ahead", set)
	}
}

// gatedWriter holds each Write until the test lets it go, and keeps the
// bytes as they are then: a stream whose window is shut copies late.
type gatedWriter struct {
	entered, proceed chan struct{}
	writes           []byte
}

func (g *gatedWriter) Write(b []byte) (int, error) {
	g.entered <- struct{}{}
	<-g.proceed
	g.writes = append(g.writes, b...)
	return len(b), nil
}

// TestFrameWriterMediaBufferNotReused: the buffer of a write too big to
// keep (a media frame) is dropped, and the frames queued during a later
// write never land in the bytes that write is still sending.
func TestFrameWriterMediaBufferNotReused(t *testing.T) {
	g := &gatedWriter{entered: make(chan struct{}), proceed: make(chan struct{})}
	fw := protocol.NewFrameWriter(g, nil, time.Second)
	want := []string{"s1", "s2", strings.Repeat("m", 300<<10), "s3", "s4"}
	write := func(text string) {
		if err := fw.Write(chunkEvent(text)); err != nil {
			t.Fatal(err)
		}
	}
	for _, text := range want[:3] {
		write(text)
		<-g.entered
		g.proceed <- struct{}{}
	}
	write(want[3])
	<-g.entered // s3's write is under way
	write(want[4])
	g.proceed <- struct{}{}
	<-g.entered // s4's own
	g.proceed <- struct{}{}
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	fr := protocol.NewFrameReader(bytes.NewReader(g.writes), protocol.MaxEventFrame)
	for i, w := range want {
		var ev pb.Event
		if err := fr.Read(&ev); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got := ev.GetChunk().GetText(); got != w {
			t.Fatalf("frame %d: %.20q, want %.20q", i, got, w)
		}
	}
}

// TestFrameWriterRefusesWhatItCannotEncode: a message that cannot be
// framed (a string that is not UTF-8) is refused with ErrEncode, the
// reader's fault being no part of it: the writer goes on with the next.
func TestFrameWriterRefusesWhatItCannotEncode(t *testing.T) {
	var out bytes.Buffer
	fw := protocol.NewFrameWriter(&out, nil, time.Second)
	if err := fw.Write(chunkEvent("\xff")); !errors.Is(err, protocol.ErrEncode) {
		t.Fatalf("Write of a string that is not UTF-8: %v, want ErrEncode", err)
	}
	if err := fw.Write(chunkEvent("ok")); err != nil {
		t.Fatal(err)
	}
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	var ev pb.Event
	if err := protocol.NewFrameReader(&out, protocol.MaxEventFrame).Read(&ev); err != nil || ev.GetChunk().GetText() != "ok" {
		t.Fatalf("read %v, %v: want the next frame whole", &ev, err)
	}
}
