// Package gguf writes tiny random-weight llama models in the GGUF format, so
// that tests can run a real inference engine (llama.cpp) without downloading
// weights. The output is gibberish; tokenization, timing, streaming and
// cancellation are real.
//
// The file layout (GGUF v3, little endian): magic "GGUF", version, tensor
// count, key/value count, the key/values, the tensor infos (name, dims,
// type, offset), padding to the alignment, then each tensor's f32 data at
// its aligned offset.
package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
)

// Config shapes the model. The zero value of a field takes its default.
type Config struct {
	Name          string // general.name; default "mtor-tiny-random"
	Embed         int    // hidden size; default 64
	Layers        int    // transformer blocks; default 2
	Heads         int    // attention heads; default 4 (Embed must divide)
	FeedForward   int    // FFN width; default 128
	ContextLength int    // trained context length; default 2048
	Seed          uint64 // weight PRNG seed; default 1
}

func (c Config) withDefaults() Config {
	if c.Name == "" {
		c.Name = "mtor-tiny-random"
	}
	if c.Embed == 0 {
		c.Embed = 64
	}
	if c.Layers == 0 {
		c.Layers = 2
	}
	if c.Heads == 0 {
		c.Heads = 4
	}
	if c.FeedForward == 0 {
		c.FeedForward = 128
	}
	if c.ContextLength == 0 {
		c.ContextLength = 2048
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.Embed < 8 || c.Embed > 4096 || c.Embed%8 != 0:
		return fmt.Errorf("gguf: embed %d: want a multiple of 8 in [8, 4096]", c.Embed)
	case c.Layers < 1 || c.Layers > 64:
		return fmt.Errorf("gguf: layers %d out of range [1, 64]", c.Layers)
	case c.Heads < 1 || c.Embed%c.Heads != 0 || (c.Embed/c.Heads)%2 != 0:
		return fmt.Errorf("gguf: %d heads do not split embed %d into even head sizes", c.Heads, c.Embed)
	case c.FeedForward < 8 || c.FeedForward > 16384 || c.FeedForward%8 != 0:
		return fmt.Errorf("gguf: feed-forward %d: want a multiple of 8 in [8, 16384]", c.FeedForward)
	case c.ContextLength < 64 || c.ContextLength > 1<<20:
		return fmt.Errorf("gguf: context length %d out of range [64, 1Mi]", c.ContextLength)
	}
	return nil
}

// Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
const (
	tokNormal  = 1
	tokUnknown = 2
	tokControl = 3
	tokByte    = 6
)

// words are extra SentencePiece pieces so that common text tokenizes into
// fewer, longer tokens, as with a real vocabulary.
var words = []string{
	"the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are",
	"with", "as", "I", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by",
	"word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up",
	"use", "your", "how", "said", "an", "each", "she", "which", "do", "their", "time", "if", "will",
	"way", "about", "many", "then", "them", "write", "would", "like", "so", "these", "her", "long",
	"make", "thing", "see", "him", "two", "has", "look", "more", "day", "could", "go", "come", "did",
	"number", "sound", "no", "most", "people", "my", "over", "know", "water", "than", "call", "first",
	"who", "may", "down", "side", "been", "now", "find", "hello", "swarm", "model", "peer", "node",
}

// Vocab is the tokenizer vocabulary: <unk>, <s>, </s>, the 256 byte tokens
// SentencePiece falls back to, printable ASCII, "▁" (SentencePiece's space)
// and some "▁word" pieces. It returns tokens, scores and types in order.
func Vocab() (tokens []string, scores []float32, types []int32) {
	add := func(t string, s float32, ty int32) {
		tokens = append(tokens, t)
		scores = append(scores, s)
		types = append(types, ty)
	}
	add("<unk>", 0, tokUnknown)
	add("<s>", 0, tokControl)
	add("</s>", 0, tokControl)
	for b := 0; b < 256; b++ {
		add(fmt.Sprintf("<0x%02X>", b), 0, tokByte)
	}
	add("▁", -1, tokNormal)
	for c := byte(0x21); c < 0x7f; c++ {
		add(string(c), -2, tokNormal)
	}
	// Longer pieces score higher so that the merge prefers them.
	for i, w := range words {
		add("▁"+w, float32(-3-i)/1000, tokNormal)
	}
	return tokens, scores, types
}

// Token ids of the special tokens in Vocab.
const (
	UnknownToken = 0
	BOSToken     = 1
	EOSToken     = 2
)

// WriteFile writes the model to path (created or truncated, mode 0644).
func WriteFile(path string, cfg Config) (err error) {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("gguf: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("gguf: %w", cerr)
		}
	}()
	return Write(f, cfg)
}

const alignment = 32

type tensor struct {
	name string
	dims []uint64 // ggml order: dims[0] is the contiguous one
	fill func(i int) float32
}

func (t tensor) elems() uint64 {
	n := uint64(1)
	for _, d := range t.dims {
		n *= d
	}
	return n
}

// Write writes the model to w.
func Write(w io.Writer, cfg Config) error {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	tokens, scores, types := Vocab()
	nVocab := uint64(len(tokens))
	e, ff := uint64(cfg.Embed), uint64(cfg.FeedForward)
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x6d746f72))
	// Uniform weights scaled by 1/sqrt(fan-in) keep activations in range.
	random := func(fanIn uint64) func(int) float32 {
		a := float32(math.Sqrt(3 / float64(fanIn)))
		return func(int) float32 { return (rng.Float32()*2 - 1) * a }
	}
	ones := func(int) float32 { return 1 }

	ts := []tensor{
		{"token_embd.weight", []uint64{e, nVocab}, random(1)},
		{"output_norm.weight", []uint64{e}, ones},
		{"output.weight", []uint64{e, nVocab}, random(e)},
	}
	for l := 0; l < cfg.Layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		ts = append(ts,
			tensor{p + "attn_norm.weight", []uint64{e}, ones},
			tensor{p + "attn_q.weight", []uint64{e, e}, random(e)},
			tensor{p + "attn_k.weight", []uint64{e, e}, random(e)},
			tensor{p + "attn_v.weight", []uint64{e, e}, random(e)},
			tensor{p + "attn_output.weight", []uint64{e, e}, random(e)},
			tensor{p + "ffn_norm.weight", []uint64{e}, ones},
			tensor{p + "ffn_gate.weight", []uint64{e, ff}, random(e)},
			tensor{p + "ffn_up.weight", []uint64{e, ff}, random(e)},
			tensor{p + "ffn_down.weight", []uint64{ff, e}, random(ff)},
		)
	}

	kvs := []kv{
		{"general.architecture", "llama"},
		{"general.name", cfg.Name},
		{"general.alignment", uint32(alignment)},
		{"general.file_type", uint32(0)}, // all F32
		{"llama.context_length", uint32(cfg.ContextLength)},
		{"llama.embedding_length", uint32(cfg.Embed)},
		{"llama.block_count", uint32(cfg.Layers)},
		{"llama.feed_forward_length", uint32(cfg.FeedForward)},
		{"llama.attention.head_count", uint32(cfg.Heads)},
		{"llama.attention.head_count_kv", uint32(cfg.Heads)},
		{"llama.attention.layer_norm_rms_epsilon", float32(1e-5)},
		{"llama.rope.dimension_count", uint32(cfg.Embed / cfg.Heads)},
		{"llama.rope.freq_base", float32(10000)},
		{"llama.vocab_size", uint32(nVocab)},
		{"tokenizer.ggml.model", "llama"},
		{"tokenizer.ggml.tokens", tokens},
		{"tokenizer.ggml.scores", scores},
		{"tokenizer.ggml.token_type", types},
		{"tokenizer.ggml.unknown_token_id", uint32(UnknownToken)},
		{"tokenizer.ggml.bos_token_id", uint32(BOSToken)},
		{"tokenizer.ggml.eos_token_id", uint32(EOSToken)},
		{"tokenizer.ggml.add_bos_token", true},
		{"tokenizer.ggml.add_eos_token", false},
	}

	bw := bufio.NewWriter(w)
	enc := &encoder{w: bw}
	enc.raw([]byte("GGUF"))
	enc.u32(3)
	enc.u64(uint64(len(ts)))
	enc.u64(uint64(len(kvs)))
	for _, p := range kvs {
		enc.kv(p)
	}
	var off uint64
	for _, t := range ts {
		enc.str(t.name)
		enc.u32(uint32(len(t.dims)))
		for _, d := range t.dims {
			enc.u64(d)
		}
		enc.u32(0) // GGML_TYPE_F32
		enc.u64(off)
		off = align(off + 4*t.elems())
	}
	enc.pad()
	for _, t := range ts {
		n := int(t.elems())
		for i := 0; i < n; i++ {
			enc.f32(t.fill(i))
		}
		enc.pad()
	}
	if enc.err != nil {
		return fmt.Errorf("gguf: write: %w", enc.err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("gguf: write: %w", err)
	}
	return nil
}

func align(n uint64) uint64 { return (n + alignment - 1) / alignment * alignment }

type kv struct {
	key string
	val any
}

// GGUF value types.
const (
	typeUint32  = 4
	typeInt32   = 5
	typeFloat32 = 6
	typeBool    = 7
	typeString  = 8
	typeArray   = 9
)

// encoder writes little-endian GGUF primitives and remembers the first
// error, so that Write checks once at the end.
type encoder struct {
	w   io.Writer
	n   uint64 // bytes written, for padding
	err error
	b   [8]byte
}

func (e *encoder) raw(p []byte) {
	if e.err != nil {
		return
	}
	var n int
	n, e.err = e.w.Write(p)
	e.n += uint64(n)
}

func (e *encoder) u32(v uint32)  { binary.LittleEndian.PutUint32(e.b[:4], v); e.raw(e.b[:4]) }
func (e *encoder) u64(v uint64)  { binary.LittleEndian.PutUint64(e.b[:8], v); e.raw(e.b[:8]) }
func (e *encoder) f32(v float32) { e.u32(math.Float32bits(v)) }
func (e *encoder) str(s string)  { e.u64(uint64(len(s))); e.raw([]byte(s)) }

func (e *encoder) pad() {
	if r := e.n % alignment; r != 0 {
		e.raw(make([]byte, alignment-r))
	}
}

func (e *encoder) kv(p kv) {
	e.str(p.key)
	switch v := p.val.(type) {
	case uint32:
		e.u32(typeUint32)
		e.u32(v)
	case float32:
		e.u32(typeFloat32)
		e.f32(v)
	case bool:
		e.u32(typeBool)
		if v {
			e.raw([]byte{1})
		} else {
			e.raw([]byte{0})
		}
	case string:
		e.u32(typeString)
		e.str(v)
	case []string:
		e.u32(typeArray)
		e.u32(typeString)
		e.u64(uint64(len(v)))
		for _, s := range v {
			e.str(s)
		}
	case []float32:
		e.u32(typeArray)
		e.u32(typeFloat32)
		e.u64(uint64(len(v)))
		for _, f := range v {
			e.f32(f)
		}
	case []int32:
		e.u32(typeArray)
		e.u32(typeInt32)
		e.u64(uint64(len(v)))
		for _, i := range v {
			e.u32(uint32(i))
		}
	default:
		if e.err == nil {
			e.err = errors.New("unsupported value type for " + p.key)
		}
	}
}
