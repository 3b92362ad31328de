package protocol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
	"google.golang.org/protobuf/proto"
)

func eventSequence() []*pb.Event {
	return []*pb.Event{
		{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: 2}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "Hel"}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: ""}}},
		{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "image/png", Data: bytes.Repeat([]byte{0xab}, 200<<10)}}},
		{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Index: 1, Vector: []float32{0.25, -1, 3e9}}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "lo ✓"}}},
		{Kind: &pb.Event_Done{Done: &pb.Done{Usage: &pb.Usage{PromptTokens: 3, CompletionTokens: 2},
			Timing: &pb.Timing{QueueMs: 1, TtftMs: 2, TotalMs: 3}, EnergyMj: 1 << 40, WorkerVersion: "mtor/1.0.0", Model: "demo"}}},
		{Kind: &pb.Event_Error{Error: &pb.Error{Code: CodeBusy, Message: "full", Retryable: true}}},
	}
}

func writeFrames[M proto.Message](t testing.TB, msgs ...M) []byte {
	t.Helper()
	var b bytes.Buffer
	for _, m := range msgs {
		if err := WriteFrame(&b, m); err != nil {
			t.Fatal(err)
		}
	}
	return b.Bytes()
}

func TestFrameRoundTrip(t *testing.T) {
	events := eventSequence()
	wire := writeFrames(t, events...)
	readers := map[string]func(io.Reader) io.Reader{
		"whole":    func(r io.Reader) io.Reader { return r },
		"one byte": iotest.OneByteReader,
		"half":     iotest.HalfReader,
		"data+EOF": iotest.DataErrReader,
	}
	for name, wrap := range readers {
		t.Run(name, func(t *testing.T) {
			fr := NewFrameReader(wrap(bytes.NewReader(wire)), MaxEventFrame)
			var got []*pb.Event
			for {
				ev := &pb.Event{}
				err := fr.Read(ev)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("frame %d: %v", len(got), err)
				}
				got = append(got, ev)
			}
			if len(got) != len(events) {
				t.Fatalf("read %d frames, wrote %d", len(got), len(events))
			}
			for i := range events {
				if !proto.Equal(got[i], events[i]) {
					t.Errorf("frame %d: got %v, want %v", i, got[i], events[i])
				}
			}
			// EOF is sticky: a clean end stays a clean end.
			if err := fr.Read(&pb.Event{}); err != io.EOF {
				t.Fatalf("second read at end = %v, want io.EOF", err)
			}
		})
	}
}

func TestFrameRequestRoundTrip(t *testing.T) {
	req := validChat()
	req.Attachments = []*pb.Attachment{{Mime: "audio/wav", Data: bytes.Repeat([]byte{1, 2, 3}, 100_000)}}
	req.Params = &pb.Params{Temperature: f32(0.7), Seed: i64(42), Stop: []string{"\n\n"}}
	fr := NewFrameReader(bytes.NewReader(writeFrames(t, req)), MaxRequestFrame)
	got := &pb.QueryRequest{}
	if err := fr.Read(got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, req) {
		t.Fatal("request changed in transit")
	}
	if err := ValidateRequest(got); err != nil {
		t.Fatal(err)
	}
}

// TestFrameNoAliasing checks that a message read earlier is not changed by
// a later read that reuses the reader's buffer.
func TestFrameNoAliasing(t *testing.T) {
	a := &pb.Media{Mime: "a/a", Data: []byte("first")}
	b := &pb.Media{Mime: "b/b", Data: []byte("other")}
	fr := NewFrameReader(bytes.NewReader(writeFrames(t, a, b)), MaxEventFrame)
	first, second := &pb.Media{}, &pb.Media{}
	if err := fr.Read(first); err != nil {
		t.Fatal(err)
	}
	if err := fr.Read(second); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(first, a) || !proto.Equal(second, b) {
		t.Fatalf("got %v and %v", first, second)
	}
}

func TestWriteFrameSingleWrite(t *testing.T) {
	var w countingWriter
	ev := eventSequence()[3] // the 200 KiB media event
	if err := WriteFrame(&w, ev); err != nil {
		t.Fatal(err)
	}
	if w.calls != 1 {
		t.Fatalf("WriteFrame made %d Write calls, want 1", w.calls)
	}
	appended, err := AppendFrame([]byte("prefix"), ev)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(appended, append([]byte("prefix"), w.buf.Bytes()...)) {
		t.Fatal("AppendFrame and WriteFrame disagree")
	}
	size := proto.Size(ev) // about 200 KiB: a 3-byte varint
	want := []byte{byte(size&0x7f | 0x80), byte(size>>7&0x7f | 0x80), byte(size >> 14)}
	if !bytes.HasPrefix(w.buf.Bytes(), want) || w.buf.Len() != size+3 {
		t.Fatalf("frame starts % x, len %d; want % x and %d", w.buf.Bytes()[:4], w.buf.Len(), want, size+3)
	}
}

type countingWriter struct {
	calls int
	buf   bytes.Buffer
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.calls++
	return w.buf.Write(p)
}

func TestWriteFrameError(t *testing.T) {
	boom := errors.New("stream reset")
	if err := WriteFrame(errWriter{boom}, &pb.Chunk{Text: "x"}); !errors.Is(err, boom) {
		t.Fatalf("WriteFrame = %v, want the writer's error", err)
	}
}

type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestFrameReaderErrors(t *testing.T) {
	chunk := writeFrames(t, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "hello"}}})
	tests := []struct {
		name  string
		input []byte
		max   int
		want  error
	}{
		{"empty stream", nil, 100, io.EOF},
		{"half a varint", []byte{0x80}, 100, io.ErrUnexpectedEOF},
		{"two thirds of a varint", []byte{0xff, 0xff}, 1 << 30, io.ErrUnexpectedEOF},
		{"length without body", []byte{0x05}, 100, io.ErrUnexpectedEOF},
		{"body cut short", chunk[:len(chunk)-1], 100, io.ErrUnexpectedEOF},
		{"second frame cut short", append(slicesClone(chunk), chunk[:3]...), 100, io.ErrUnexpectedEOF},
		{"large body cut short", append([]byte{0x80, 0x80, 0x10}, make([]byte, 100_000)...), MaxEventFrame, io.ErrUnexpectedEOF},
		{"one over the limit", []byte{0x65}, 100, ErrFrameTooLarge},
		{"limit of the event frame", append([]byte{0x81, 0x80, 0x80, 0x04}, 1, 2, 3), MaxEventFrame, ErrFrameTooLarge},
		{"largest uvarint63", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, MaxRequestFrame, ErrFrameTooLarge},
		{"negative limit reads as zero", []byte{0x01, 0x00}, -1, ErrFrameTooLarge},
		{"non-minimal zero", []byte{0x80, 0x00}, 100, ErrMalformedFrame},
		{"non-minimal one", []byte{0x81, 0x00, 0x08}, 100, ErrMalformedFrame},
		{"non-minimal long", []byte{0x85, 0x80, 0x80, 0x00}, 100, ErrMalformedFrame},
		{"ten-byte varint", []byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01}, 100, ErrMalformedFrame},
		{"uint64 max", []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, 100, ErrMalformedFrame},
		{"truncated tag", []byte{0x01, 0xff}, 100, ErrMalformedFrame},
		{"field number zero", []byte{0x02, 0x00, 0x00}, 100, ErrMalformedFrame},
		{"length past the body", []byte{0x02, 0x12, 0x05}, 100, ErrMalformedFrame},
		{"invalid utf-8 text", []byte{0x05, 0x12, 0x03, 0x0a, 0x01, 0xff}, 100, ErrMalformedFrame},
		{"group end without start", []byte{0x01, 0x0c}, 100, ErrMalformedFrame},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fr := NewFrameReader(bytes.NewReader(tc.input), tc.max)
			var err error
			for range 10 { // complete frames before the bad one read fine
				if err = fr.Read(&pb.Event{}); err != nil {
					break
				}
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Read = %v, want %v", err, tc.want)
			}
			if tc.want == io.EOF || tc.want == io.ErrUnexpectedEOF {
				if err != tc.want {
					t.Fatalf("Read = %#v, want exactly %v (callers compare with ==)", err, tc.want)
				}
			}
		})
	}
}

func slicesClone(b []byte) []byte { return append([]byte(nil), b...) }

func TestFrameReaderAtLimit(t *testing.T) {
	m := &pb.Chunk{Text: strings.Repeat("x", 98)} // 2 bytes of key and length + 98
	if proto.Size(m) != 100 {
		t.Fatalf("size %d", proto.Size(m))
	}
	wire := writeFrames(t, m)
	if err := NewFrameReader(bytes.NewReader(wire), 100).Read(&pb.Chunk{}); err != nil {
		t.Fatalf("frame at the limit: %v", err)
	}
	if err := NewFrameReader(bytes.NewReader(wire), 99).Read(&pb.Chunk{}); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("frame over the limit: %v", err)
	}
}

func TestFrameEmptyMessage(t *testing.T) {
	// A zero-length frame is a valid empty message; validation rejects it.
	fr := NewFrameReader(bytes.NewReader([]byte{0x00, 0x00}), 100)
	for i := range 2 {
		ev := &pb.Event{Kind: &pb.Event_Chunk{}} // Read must reset m
		if err := fr.Read(ev); err != nil {
			t.Fatal(err)
		}
		if ev.GetKind() != nil {
			t.Fatalf("frame %d: message not reset: %v", i, ev)
		}
	}
	if err := fr.Read(&pb.Event{}); err != io.EOF {
		t.Fatalf("got %v, want io.EOF", err)
	}
}

// TestFrameUnknownFieldsKept checks forward compatibility: fields a newer
// peer adds are skipped by this reader, not rejected.
func TestFrameUnknownFieldsKept(t *testing.T) {
	wire := []byte{0x09, 0x0a, 0x02, 'h', 'i', 0xf8, 0x07, 0x01, 0x20, 0x05} // text="hi", field 127 = 1, field 4 = 5
	c := &pb.Chunk{}
	if err := NewFrameReader(bytes.NewReader(wire), 100).Read(c); err != nil {
		t.Fatal(err)
	}
	if c.GetText() != "hi" {
		t.Fatalf("text %q", c.GetText())
	}
}

func TestFrameReaderPassesReadErrors(t *testing.T) {
	boom := errors.New("stream reset")
	for _, input := range [][]byte{nil, {0x05, 'a'}, {0x80, 0x80, 0x04}} {
		r := io.MultiReader(bytes.NewReader(input), iotest.ErrReader(boom))
		if err := NewFrameReader(r, MaxEventFrame).Read(&pb.Event{}); !errors.Is(err, boom) {
			t.Errorf("input % x: got %v, want the reader's error", input, err)
		}
	}
}

// TestFrameReaderBoundedAllocation checks that the reader allocates for
// what it receives, not for what the length prefix claims: an oversized
// claim is refused before allocating, and a large claim followed by a stall
// pins about what was sent.
func TestFrameReaderBoundedAllocation(t *testing.T) {
	tests := []struct {
		name  string
		input []byte
		want  error
	}{
		{"claim over the limit", []byte{0x81, 0x80, 0x80, 0x04}, ErrFrameTooLarge},
		{"claim of 2^62", []byte{0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40}, ErrFrameTooLarge},
		{"claim at the limit then stall", append([]byte{0x80, 0x80, 0x80, 0x04}, make([]byte, 1000)...), io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const runs = 20
			alloc := allocatedBytes(func() {
				for range runs {
					err := NewFrameReader(bytes.NewReader(tc.input), MaxEventFrame).Read(&pb.Event{})
					if !errors.Is(err, tc.want) {
						t.Fatalf("Read = %v, want %v", err, tc.want)
					}
				}
			})
			// Each run may allocate the bufio buffer, the 64 KiB first
			// chunk and an error; an allocation of the claim would be 8 MiB.
			if perRun := alloc / runs; perRun > 128<<10 {
				t.Fatalf("allocated %d bytes per read", perRun)
			}
		})
	}
}

func allocatedBytes(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

func TestFrameReaderReserveRefusesBeforeReading(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteFrame(&buf, &pb.Chunk{Text: strings.Repeat("x", 1000)}); err != nil {
		t.Fatal(err)
	}
	fr := NewFrameReader(&buf, MaxEventFrame)
	asked := 0
	fr.SetReserve(func(n int) error { asked = n; return errors.New("over the limit") })
	var c pb.Chunk
	err := fr.Read(&c)
	if !errors.Is(err, ErrNoMemory) || asked < 1000 || asked > 1010 {
		t.Fatalf("err = %v, asked %d: want ErrNoMemory after asking for the frame's length", err, asked)
	}
}

// TestFrameReaderReady: Ready is true exactly when a whole frame is read
// ahead, and never reads from the stream itself.
func TestFrameReaderReady(t *testing.T) {
	var two []byte
	var err error
	for _, text := range []string{"one", "two"} {
		if two, err = AppendFrame(two, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text}}}); err != nil {
			t.Fatal(err)
		}
	}
	first := len(two) / 2 // both frames are the same size
	r, w := io.Pipe()
	defer r.Close()
	fr := NewFrameReader(r, MaxEventFrame)
	if fr.Ready() {
		t.Fatal("ready before anything arrived")
	}
	go func() { _, _ = w.Write(two[:len(two)-1]) }() // the first frame and most of the second
	var ev pb.Event
	if err := fr.Read(&ev); err != nil || ev.GetChunk().GetText() != "one" {
		t.Fatalf("first: %v %v", &ev, err)
	}
	if fr.Ready() {
		t.Fatalf("ready with %d of %d bytes of the second frame", len(two)-1-first, len(two)-first)
	}
	go func() { _, _ = w.Write(two[len(two)-1:]) }()
	if err := fr.Read(&ev); err != nil || ev.GetChunk().GetText() != "two" {
		t.Fatalf("second: %v %v", &ev, err)
	}
	// Both frames in one write: after the first Read the second is ready.
	go func() { _, _ = w.Write(two) }()
	if err := fr.Read(&ev); err != nil {
		t.Fatal(err)
	}
	if !fr.Ready() {
		t.Fatal("the second frame of one write is not ready")
	}
	if err := fr.Read(&ev); err != nil || ev.GetChunk().GetText() != "two" {
		t.Fatalf("second again: %v %v", &ev, err)
	}
	if fr.Ready() {
		t.Fatal("ready with nothing left")
	}
}

// TestFrameReaderReservesWhatArrives: a peer that claims an 8 MiB frame
// and sends 100 KiB of it gets about that much reserved, not its claim;
// a whole large frame reserves its length, no more.
func TestFrameReaderReservesWhatArrives(t *testing.T) {
	const claim = 8 << 20
	for _, tc := range []struct {
		name      string
		sent      int
		maxAsked  int
		wantWhole bool
	}{
		{"claim, then little", 100 << 10, 256 << 10, false},
		{"the whole frame", claim, claim, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frame, err := AppendFrame(nil, &pb.Chunk{Text: strings.Repeat("x", claim-8)})
			if err != nil {
				t.Fatal(err)
			}
			body, k := binary.Uvarint(frame)
			sent := min(tc.sent, int(body))
			fr := NewFrameReader(bytes.NewReader(frame[:k+sent]), 2*claim)
			asked := 0
			fr.SetReserve(func(k int) error { asked += k; return nil })
			var c pb.Chunk
			err = fr.Read(&c)
			if tc.wantWhole != (err == nil) {
				t.Fatalf("read: %v", err)
			}
			if asked > min(tc.maxAsked, int(body)) || asked < sent {
				t.Fatalf("reserved %d bytes for %d sent of a %d-byte frame, want between them and %d", asked, sent, body, tc.maxAsked)
			}
		})
	}
}

// TestReadAfterADeadline: a read deadline that passes before a frame
// began wraps ErrBetweenFrames, and the next Read gets the frame whole;
// one that passes inside a frame does not (the reader is out of step).
func TestReadAfterADeadline(t *testing.T) {
	frame, err := AppendFrame(nil, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "after the wait"}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		early   int // bytes of the frame written before the deadline
		between bool
	}{
		{"before the frame", 0, true},
		{"inside the frame", 3, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			defer b.Close()
			go func() { _, _ = b.Write(frame[:tc.early]) }()
			fr := NewFrameReader(a, MaxEventFrame)
			_ = a.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			var ev pb.Event
			err := fr.Read(&ev)
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() || errors.Is(err, ErrBetweenFrames) != tc.between {
				t.Fatalf("read past the deadline: %v; want a timeout, between frames %v", err, tc.between)
			}
			if !tc.between {
				return
			}
			go func() { _, _ = b.Write(frame) }()
			_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
			if err := fr.Read(&ev); err != nil || ev.GetChunk().GetText() != "after the wait" {
				t.Fatalf("read after the deadline: %v, %v", &ev, err)
			}
		})
	}
}
