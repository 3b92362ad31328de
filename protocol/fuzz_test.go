package protocol

import (
	"bytes"
	"errors"
	"io"
	"math"
	"runtime"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
	"google.golang.org/protobuf/proto"
)

// Seeds shared by the fuzzers and their corpus under testdata/fuzz.
func seedRequests() []*pb.QueryRequest {
	vision := &pb.QueryRequest{Id: testID(), Type: pb.QueryType_QUERY_TYPE_VISION, Model: "llava",
		Messages: []*pb.Message{{Role: "user", Content: "what is this?", Attachments: []*pb.Attachment{img()}}}}
	stt := &pb.QueryRequest{Id: testID(), Type: pb.QueryType_QUERY_TYPE_STT, Model: "whisper",
		Attachments: []*pb.Attachment{snd()}, Priority: -3, DeadlineUnixMs: 1767225600000}
	embed := &pb.QueryRequest{Id: testID(), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: "nomic", Inputs: []string{"a", "b"}}
	imagine := &pb.QueryRequest{Id: testID(), Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: "sdxl", Prompt: "a cat",
		Params: &pb.Params{Size: "512x512", Seed: i64(7), Format: "png"}}
	chat := validChat()
	chat.Params = &pb.Params{MaxTokens: 64, Temperature: f32(0.7), TopP: f32(0.9), Stop: []string{"\n"}}
	return []*pb.QueryRequest{validChat(), chat, vision, stt, embed, imagine}
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// refFrame is the framing rule of docs/protocol.md, written out plainly: it
// says what the next Read must return for data at offset off.
func refFrame(data []byte, limit int) (body []byte, rest []byte, want error) {
	if len(data) == 0 {
		return nil, nil, io.EOF
	}
	var n uint64
	for i := 0; ; i++ {
		if i == len(data) {
			return nil, nil, io.ErrUnexpectedEOF
		}
		b := data[i]
		if i == 8 && b >= 0x80 { // more than 9 bytes: over 63 bits
			return nil, nil, ErrMalformedFrame
		}
		if b < 0x80 {
			if b == 0 && i > 0 { // not the shortest encoding
				return nil, nil, ErrMalformedFrame
			}
			n |= uint64(b) << (7 * i)
			data = data[i+1:]
			break
		}
		n |= uint64(b&0x7f) << (7 * i)
	}
	if n > uint64(max(limit, 0)) {
		return nil, nil, ErrFrameTooLarge
	}
	if uint64(len(data)) < n {
		return nil, nil, io.ErrUnexpectedEOF
	}
	return data[:n], data[n:], nil
}

// checkFrames reads data as a stream of frames of type M and compares each
// outcome with refFrame and a direct proto.Unmarshal of the body.
func checkFrames[M proto.Message](t *testing.T, data []byte, limit int, newM func() M, validate func(M) error) {
	fr := NewFrameReader(bytes.NewReader(data), limit)
	rest := data
	for i := 0; ; i++ {
		var body []byte
		var want error
		body, rest, want = refFrame(rest, limit)

		got := newM()
		var err error
		alloc := allocatedBytesNoGC(func() { err = fr.Read(got) })
		// The reader allocates for what arrived, never for the claim: at
		// most its first 64 KiB chunk, doubling growth and what the decoded
		// message itself needs.
		if bound := uint64(256<<10 + 256*len(data)); alloc > bound {
			t.Fatalf("frame %d: allocated %d bytes for %d bytes of input (limit %d)", i, alloc, len(data), limit)
		}
		if want == nil {
			ref := newM()
			if uerr := proto.Unmarshal(body, ref); uerr != nil {
				want = ErrMalformedFrame
			} else if err == nil && !proto.Equal(got, ref) {
				t.Fatalf("frame %d: reader decoded %v, direct decoding gives %v", i, got, ref)
			}
		}
		switch {
		case want == io.EOF || want == io.ErrUnexpectedEOF:
			if err != want {
				t.Fatalf("frame %d: Read = %v, want exactly %v", i, err, want)
			}
		case !errors.Is(err, want):
			t.Fatalf("frame %d: Read = %v, want %v", i, err, want)
		}
		if err != nil {
			return
		}
		if verr := validate(got); verr != nil {
			var pe *Error
			if !errors.As(verr, &pe) || pe.Code != CodeBadRequest {
				t.Fatalf("frame %d: validation error %v is not a typed BAD_REQUEST", i, verr)
			}
		}
	}
}

// allocatedBytesNoGC measures the bytes f allocates without forcing a GC,
// which would make fuzzing crawl.
func allocatedBytesNoGC(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

func FuzzFrameReader(f *testing.F) {
	var wire []byte
	for _, r := range seedRequests() {
		wire, _ = AppendFrame(wire, r)
	}
	f.Add(wire, uint32(MaxRequestFrame))
	events := eventSequence()
	events[3] = &pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "audio/wav", Data: []byte("RIFF....WAVE")}}}
	f.Add(writeFrames(f, events...), uint32(MaxEventFrame))
	f.Add(writeFrames(f, events[1]), uint32(4))
	f.Add([]byte{}, uint32(100))
	f.Add([]byte{0x80, 0x00}, uint32(100))
	f.Add([]byte{0x81, 0x80, 0x80, 0x04}, uint32(MaxEventFrame))
	f.Add([]byte{0x80, 0x80, 0x10, 1, 2, 3}, uint32(MaxEventFrame))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, uint32(MaxEventFrame))
	f.Add([]byte{0x05, 0x12, 0x03, 0x0a, 0x01, 0xff}, uint32(100))
	f.Fuzz(func(t *testing.T, data []byte, limit uint32) {
		lim := int(limit % (MaxRequestFrame + 1))
		checkFrames(t, data, lim, func() *pb.QueryRequest { return &pb.QueryRequest{} },
			func(r *pb.QueryRequest) error { return ValidateRequest(r) })
		checkFrames(t, data, lim, func() *pb.Event { return &pb.Event{} },
			func(e *pb.Event) error { return ValidateEvent(e) })
	})
}

func FuzzValidateRequest(f *testing.F) {
	for _, r := range seedRequests() {
		f.Add(mustMarshal(f, r))
	}
	bad := validChat()
	bad.Params = &pb.Params{Temperature: f32(float32(math.NaN()))}
	f.Add(mustMarshal(f, bad))
	bad = validChat()
	bad.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png"}}
	f.Add(mustMarshal(f, bad))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &pb.QueryRequest{}
		if proto.Unmarshal(data, r) != nil {
			return
		}
		err := ValidateRequest(r)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Code != CodeBadRequest || pe.Retryable {
				t.Fatalf("ValidateRequest = %v, want a typed BAD_REQUEST", err)
			}
			return
		}
		// A valid request survives the wire unchanged and stays valid.
		framed, err := AppendFrame(nil, r)
		if err != nil {
			t.Fatalf("valid request does not marshal: %v", err)
		}
		back := &pb.QueryRequest{}
		if err := NewFrameReader(bytes.NewReader(framed), MaxRequestFrame).Read(back); err != nil {
			t.Fatalf("valid request does not read back: %v", err)
		}
		if !proto.Equal(r, back) {
			t.Fatalf("round trip changed the request:\n%v\n%v", r, back)
		}
		if err := ValidateRequest(back); err != nil {
			t.Fatalf("round trip made the request invalid: %v", err)
		}
		if TypeName(back.GetType()) == "" || len(back.GetId()) != IDLen {
			t.Fatal("validated request without a type name or id")
		}
	})
}

func FuzzValidateAnnounce(f *testing.F) {
	now := annNow.UnixMilli()
	f.Add(mustMarshal(f, validAnnounce()), now)
	a := validAnnounce()
	a.Roles, a.Models, a.Gpus, a.Load = []string{"bridge"}, nil, nil, nil
	f.Add(mustMarshal(f, a), now)
	a = validAnnounce()
	a.TimeUnixMs = now + MaxClockSkew.Milliseconds() + 1
	f.Add(mustMarshal(f, a), now)
	a = validAnnounce()
	a.Models[0].TokensPerSec = float32(math.Inf(1))
	f.Add(mustMarshal(f, a), now)
	f.Add([]byte{}, int64(0))
	f.Add(mustMarshal(f, validAnnounce()), int64(math.MinInt64))
	f.Fuzz(func(t *testing.T, data []byte, nowMs int64) {
		a := &pb.Announce{}
		if proto.Unmarshal(data, a) != nil {
			return
		}
		now := time.UnixMilli(nowMs)
		err := ValidateAnnounce(a, now)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) || pe.Code != CodeBadRequest {
				t.Fatalf("ValidateAnnounce = %v, want a typed BAD_REQUEST", err)
			}
			return
		}
		// What routing relies on once an announcement is accepted.
		ttl := time.Duration(a.GetTtlMs()) * time.Millisecond
		if a.GetSeq() == 0 || ttl < MinAnnounceTTL || ttl > MaxAnnounceTTL || a.GetHealth() > 100 {
			t.Fatalf("accepted announce with seq %d ttl %s health %d", a.GetSeq(), ttl, a.GetHealth())
		}
		if time.UnixMilli(a.GetTimeUnixMs()).After(now.Add(MaxClockSkew)) {
			t.Fatal("accepted a future-dated announce")
		}
		for _, m := range a.GetModels() {
			tps, jpt := float64(m.GetTokensPerSec()), float64(m.GetJoulesPerToken())
			if math.IsNaN(tps) || math.IsInf(tps, 0) || tps < 0 || math.IsNaN(jpt) || math.IsInf(jpt, 0) || jpt < 0 {
				t.Fatalf("accepted figures %v, %v", tps, jpt)
			}
			if a.GetLoad().GetMaxConcurrency() == 0 {
				t.Fatal("accepted a worker with models and no capacity")
			}
		}
		back := &pb.Announce{}
		if err := proto.Unmarshal(mustMarshal(t, a), back); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(a, back) {
			t.Fatal("round trip changed the announce")
		}
		if err := ValidateAnnounce(back, now); err != nil {
			t.Fatalf("round trip made the announce invalid: %v", err)
		}
	})
}
