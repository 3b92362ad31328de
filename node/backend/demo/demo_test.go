package demo

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type collect struct {
	text  strings.Builder
	mimes []string
	vecs  int
}

func (c *collect) Chunk(s string) error { c.text.WriteString(s); return nil }
func (c *collect) Media(m string, d []byte) error {
	if len(d) == 0 {
		return nil
	}
	c.mimes = append(c.mimes, m)
	return nil
}
func (c *collect) Embedding(int, []float32) error { c.vecs++; return nil }

func TestEveryTypeAnswersAndSaysItIsADemo(t *testing.T) {
	b := New("peer-x", WithDelay(0))
	tests := []struct {
		typ      pb.QueryType
		req      *pb.QueryRequest
		wantText string
		wantMime string
		wantVecs int
	}{
		{pb.QueryType_QUERY_TYPE_CHAT, &pb.QueryRequest{Prompt: "hello"}, "[demo answer from peer-x] You said: hello", "", 0},
		{pb.QueryType_QUERY_TYPE_VISION, &pb.QueryRequest{Messages: []*pb.Message{{Role: "user", Content: "what?", Attachments: []*pb.Attachment{{Mime: "image/png", Data: []byte{1}}}}}}, "received 1 image(s)", "", 0},
		{pb.QueryType_QUERY_TYPE_STT, &pb.QueryRequest{Attachments: []*pb.Attachment{{Mime: "audio/webm", Data: []byte{1, 2, 3}}}}, "[demo transcription from peer-x] 3 bytes", "", 0},
		{pb.QueryType_QUERY_TYPE_IMAGINE, &pb.QueryRequest{Prompt: "a cat"}, "", "image/png", 0},
		{pb.QueryType_QUERY_TYPE_TTS, &pb.QueryRequest{Prompt: "say"}, "", "audio/wav", 0},
		{pb.QueryType_QUERY_TYPE_EMBED, &pb.QueryRequest{Inputs: []string{"a", "b"}}, "", "", 2},
	}
	for _, tc := range tests {
		t.Run(protocol.TypeName(tc.typ), func(t *testing.T) {
			tc.req.Type, tc.req.Model = tc.typ, DefaultModel
			var c collect
			if _, err := b.Run(context.Background(), tc.req, &c); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(c.text.String(), tc.wantText) || (tc.wantMime != "" && (len(c.mimes) != 1 || c.mimes[0] != tc.wantMime)) || c.vecs != tc.wantVecs {
				t.Fatalf("text %q mimes %v vecs %d", c.text.String(), c.mimes, c.vecs)
			}
		})
	}
}

func TestDeterministicAndCancellable(t *testing.T) {
	b := New("p", WithDelay(0))
	run := func() string {
		var c collect
		_, _ = b.Run(context.Background(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: DefaultModel, Prompt: "same"}, &c)
		return c.text.String()
	}
	if run() != run() {
		t.Fatal("demo answers differ for the same prompt")
	}
	slow := New("p", WithDelay(time.Hour))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	var c collect
	_, err := slow.Run(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: DefaultModel, Prompt: "a b c"}, &c)
	if err == nil {
		t.Fatal("a cancelled demo query returned no error")
	}
	if _, err := b.Run(context.Background(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "other", Prompt: "x"}, &c); protocol.AsError(err).Code != protocol.CodeUnsupported {
		t.Fatalf("wrong model: %v", err)
	}
}

func TestParseOptions(t *testing.T) {
	tests := []struct {
		in      string
		wantErr bool
		delay   time.Duration
		first   time.Duration
	}{
		{"", false, DefaultDelay, 0},
		{"delay=0", false, 0, 0},
		{"delay=25", false, 25 * time.Millisecond, 0},
		{"delay=2ms,model=tiny", false, 2 * time.Millisecond, 0},
		{"delay=2ms,first=80ms", false, 2 * time.Millisecond, 80 * time.Millisecond},
		{"first=40", false, DefaultDelay, 40 * time.Millisecond},
		{"delay=2m", true, 0, 0},
		{"delay=x", true, 0, 0},
		{"first=-1", true, 0, 0},
		{"speed=1", true, 0, 0},
		{"delay", true, 0, 0},
	}
	for _, tc := range tests {
		opts, err := ParseOptions(tc.in)
		if (err != nil) != tc.wantErr {
			t.Fatalf("%q: err %v", tc.in, err)
		}
		if err == nil {
			if b := New("p", opts...); b.delay != tc.delay || b.first != tc.first {
				t.Fatalf("%q: delay %s and first %s, want %s and %s", tc.in, b.delay, b.first, tc.delay, tc.first)
			}
		}
	}
}

// TestSeededAnswersAgreeAcrossWorkers: two demo workers give one seeded
// query the same answer (honesty spot checks compare them); unseeded
// answers still name the worker.
func TestSeededAnswersAgreeAcrossWorkers(t *testing.T) {
	seed := int64(42)
	run := func(b *Backend, p *pb.Params) string {
		var c collect
		req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: DefaultModel, Prompt: "same words", Params: p}
		if _, err := b.Run(context.Background(), req, &c); err != nil {
			t.Fatal(err)
		}
		return c.text.String()
	}
	a, b := New("peer-a", WithDelay(0)), New("peer-b", WithDelay(0))
	tests := []struct {
		name   string
		params *pb.Params
		same   bool
		want   string
	}{
		{"seeded", &pb.Params{Seed: &seed}, true, "[demo answer for seed 42] You said: same words"},
		{"unseeded", nil, false, "[demo answer from peer-a] You said: same words"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ta, tb := run(a, tc.params), run(b, tc.params)
			if (ta == tb) != tc.same || ta != tc.want {
				t.Fatalf("worker a %q, worker b %q; want %q, same=%v", ta, tb, tc.want, tc.same)
			}
		})
	}
}

// firstAt notes when the first chunk came.
type firstAt struct {
	collect
	at time.Time
}

func (f *firstAt) Chunk(s string) error {
	if f.at.IsZero() {
		f.at = time.Now()
	}
	return f.collect.Chunk(s)
}

// TestFirstPause: first= holds the first token back, as a model's prompt
// processing does.
func TestFirstPause(t *testing.T) {
	const first = 80 * time.Millisecond
	b := New("p", WithDelay(0), WithFirst(first))
	var f firstAt
	start := time.Now()
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: DefaultModel, Prompt: "hello"}
	if _, err := b.Run(context.Background(), req, &f); err != nil {
		t.Fatal(err)
	}
	if got := f.at.Sub(start); got < first {
		t.Fatalf("first=%s: first token after %s", first, got)
	}
}
