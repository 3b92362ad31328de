// Package demo is the built-in demo backend: deterministic, no model, no
// GPU. Every answer says it comes from the demo and which peer gave it, so
// nobody mistakes it for a model.
package demo

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"image"
	"image/color"
	"image/png"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// DefaultDelay is the pause between streamed tokens.
const DefaultDelay = 5 * time.Millisecond

// DefaultModel is the model name the demo serves.
const DefaultModel = "demo"

// Backend is the demo backend.
type Backend struct {
	label string // who answers, usually the short peer ID
	delay time.Duration
	first time.Duration // before the first token: a model's prefill
	model string
}

// Option configures the demo backend.
type Option func(*Backend)

// WithDelay sets the pause between tokens (0 for benchmarks).
func WithDelay(d time.Duration) Option { return func(b *Backend) { b.delay = d } }

// WithFirst sets the pause before the first token, as a model's prompt
// processing takes (0, the default, for none).
func WithFirst(d time.Duration) Option { return func(b *Backend) { b.first = d } }

// WithModel sets the served model name.
func WithModel(name string) Option { return func(b *Backend) { b.model = name } }

// New builds a demo backend answering as label.
func New(label string, opts ...Option) *Backend {
	b := &Backend{label: label, delay: DefaultDelay, model: DefaultModel}
	for _, o := range opts {
		o(b)
	}
	return b
}

// ParseOptions parses the part of a --backend spec after "demo:", a comma
// separated list of key=value: delay=DURATION (or milliseconds) between
// tokens, first=DURATION (or milliseconds) before the first, model=NAME.
func ParseOptions(s string) ([]Option, error) {
	var opts []Option
	if s == "" {
		return nil, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("demo option %q: want key=value", kv)
		}
		switch k {
		case "delay", "first":
			d, err := time.ParseDuration(v)
			if err != nil {
				ms, err2 := strconv.Atoi(v)
				if err2 != nil || ms < 0 {
					return nil, fmt.Errorf("demo %s %q: %w", k, v, err)
				}
				d = time.Duration(ms) * time.Millisecond
			}
			if d < 0 || d > time.Minute {
				return nil, fmt.Errorf("demo %s %s out of range [0, 1m]", k, d)
			}
			if k == "first" {
				opts = append(opts, WithFirst(d))
			} else {
				opts = append(opts, WithDelay(d))
			}
		case "model":
			if err := protocol.ValidateModelName(v); err != nil {
				return nil, fmt.Errorf("demo model: %w", err)
			}
			opts = append(opts, WithModel(v))
		default:
			return nil, fmt.Errorf("unknown demo option %q (want delay, first or model)", k)
		}
	}
	return opts, nil
}

func (b *Backend) Kind() string { return "demo" }
func (b *Backend) Name() string { return "demo (built in, not a model)" }

// Models reports one model serving every query type.
func (b *Backend) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: b.model, Types: protocol.AllTypes(), ContextLength: 4096,
		Features: []string{protocol.FeatureContinue}}}, nil
}

func (b *Backend) Probe(context.Context) error { return nil }

// Run answers deterministically for the query's type.
func (b *Backend) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if req.GetModel() != b.model {
		return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "demo backend serves model %q, not %q", b.model, req.GetModel())
	}
	prompt := lastText(req)
	promptTokens := uint32(len(strings.Fields(prompt)))
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		img, err := pngFor(prompt)
		if err != nil {
			return backend.Usage{}, err
		}
		return backend.Usage{PromptTokens: promptTokens}, out.Media("image/png", img)
	case pb.QueryType_QUERY_TYPE_TTS:
		return backend.Usage{PromptTokens: promptTokens}, out.Media("audio/wav", wavFor(prompt))
	case pb.QueryType_QUERY_TYPE_EMBED:
		inputs := req.GetInputs()
		if len(inputs) == 0 {
			inputs = []string{req.GetPrompt()}
		}
		for i, in := range inputs {
			if err := out.Embedding(i, vectorFor(in)); err != nil {
				return backend.Usage{}, err
			}
		}
		return backend.Usage{PromptTokens: promptTokens}, nil
	}
	text := continueAfter(b.answer(req, prompt), req.GetContinuation())
	words := strings.SplitAfter(text, " ")
	if text == "" {
		words = nil
	}
	if m := req.GetParams().GetMaxTokens(); m > 0 && int(m) < len(words) {
		words = words[:m]
	}
	var t *time.Timer
	for i, w := range words {
		pause := b.delay
		if i == 0 {
			pause = b.first
		}
		if pause > 0 {
			if t == nil {
				t = time.NewTimer(pause)
				defer t.Stop()
			} else {
				t.Reset(pause)
			}
			select {
			case <-ctx.Done():
				return backend.Usage{}, ctx.Err()
			case <-t.C:
			}
		} else if err := ctx.Err(); err != nil {
			return backend.Usage{}, err
		}
		if err := out.Chunk(w); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{PromptTokens: promptTokens, CompletionTokens: uint32(len(words))}, nil
}

func (b *Backend) answer(req *pb.QueryRequest, prompt string) string {
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_VISION:
		n := 0
		for _, m := range req.GetMessages() {
			n += len(m.GetAttachments())
		}
		n += len(req.GetAttachments())
		return fmt.Sprintf("[demo answer %s] I cannot see, but I received %d image(s) and the question: %s", b.from(req), n, prompt)
	case pb.QueryType_QUERY_TYPE_STT:
		size := 0
		for _, a := range req.GetAttachments() {
			size += len(a.GetData())
		}
		return fmt.Sprintf("[demo transcription %s] %d bytes of audio received", b.from(req), size)
	}
	return fmt.Sprintf("[demo answer %s] You said: %s", b.from(req), prompt)
}

// from says who answers: "from PEER", or "for seed N" when the query
// fixes a seed, so that every honest demo worker gives one seeded query
// the same answer, as a deterministic model would (honesty spot checks
// compare them).
func (b *Backend) from(req *pb.QueryRequest) string {
	if p := req.GetParams(); p != nil && p.Seed != nil {
		return fmt.Sprintf("for seed %d", p.GetSeed())
	}
	return "from " + b.label
}

// continueAfter is what follows done (an answer another worker began)
// in this demo's answer full. The demo's answers differ only in their
// "[demo … from PEER]" header, so once done is past its header the rest of
// the body follows; within the header, this worker's own header follows.
func continueAfter(full, done string) string {
	if done == "" {
		return full
	}
	if rest, ok := strings.CutPrefix(full, done); ok {
		return rest
	}
	_, body, okFull := strings.Cut(full, "] ")
	_, doneBody, okDone := strings.Cut(done, "] ")
	if okFull && okDone {
		if rest, ok := strings.CutPrefix(body, doneBody); ok {
			return rest
		}
	}
	// Not a demo answer this worker can place: say so rather than repeat.
	return " [demo: cannot continue this text]"
}

// lastText is the prompt, or the content of the last user message.
func lastText(req *pb.QueryRequest) string {
	if p := strings.TrimSpace(req.GetPrompt()); p != "" {
		return p
	}
	msgs := req.GetMessages()
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].GetRole() == "user" {
			return strings.TrimSpace(msgs[i].GetContent())
		}
	}
	if len(msgs) > 0 {
		return strings.TrimSpace(msgs[len(msgs)-1].GetContent())
	}
	return ""
}

func seed(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

// vectorFor is a deterministic unit vector of dimension 16 for s.
func vectorFor(s string) []float32 {
	v := make([]float32, 16)
	x := seed(s)
	var norm float64
	for i := range v {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		f := float64(int64(x%2001)-1000) / 1000
		v[i] = float32(f)
		norm += f * f
	}
	if norm > 0 {
		for i := range v {
			v[i] = float32(float64(v[i]) / math.Sqrt(norm))
		}
	}
	return v
}

// pngFor draws a 64x64 gradient whose colours derive from the prompt.
func pngFor(s string) ([]byte, error) {
	x := seed(s)
	img := image.NewRGBA(image.Rect(0, 0, 64, 64))
	for py := 0; py < 64; py++ {
		for px := 0; px < 64; px++ {
			img.Set(px, py, color.RGBA{uint8(x) + uint8(px*4), uint8(x>>8) + uint8(py*4), uint8(x >> 16), 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		return nil, fmt.Errorf("encode demo image: %w", err)
	}
	return buf.Bytes(), nil
}

// wavFor is half a second of a tone whose pitch derives from the text.
func wavFor(s string) []byte {
	const rate = 8000
	n := rate / 2
	freq := 300 + float64(seed(s)%500)
	var buf bytes.Buffer
	w := func(v any) { _ = binary.Write(&buf, binary.LittleEndian, v) }
	buf.WriteString("RIFF")
	w(uint32(36 + n*2))
	buf.WriteString("WAVEfmt ")
	w(uint32(16))
	w(uint16(1))
	w(uint16(1))
	w(uint32(rate))
	w(uint32(rate * 2))
	w(uint16(2))
	w(uint16(16))
	buf.WriteString("data")
	w(uint32(n * 2))
	for i := 0; i < n; i++ {
		w(int16(8000 * math.Sin(2*math.Pi*freq*float64(i)/rate)))
	}
	return buf.Bytes()
}
