package canary

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	_ "image/gif" // decoders for the media a worker may answer with
	_ "image/jpeg"
	_ "image/png"
	"math"
	"math/bits"
	"unicode"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Comparison defaults. Greedy decoding of one model on other hardware or
// another quantisation drifts apart after a while (float sums in another
// order pick another token at a near tie), so chat answers are compared
// on the prefix, and need not match whole; embeddings and images are
// compared by similarity, not bytes.
const (
	DefaultPrefixTokens = 16   // tokens of each chat answer compared
	DefaultPrefixAgree  = 0.5  // share of them the common prefix must cover
	DefaultCosine       = 0.98 // least cosine similarity of two embeddings
	DefaultHashDistance = 12   // most differing bits of two 64-bit image hashes
)

// Thresholds say when two answers to one canary agree.
type Thresholds struct {
	PrefixTokens int
	PrefixAgree  float64
	Cosine       float64
	HashDistance int
}

// DefaultThresholds are the defaults above.
func DefaultThresholds() Thresholds {
	return Thresholds{PrefixTokens: DefaultPrefixTokens, PrefixAgree: DefaultPrefixAgree,
		Cosine: DefaultCosine, HashDistance: DefaultHashDistance}
}

// Answer is one worker's answer to a canary, reduced to what is compared.
type Answer struct {
	Text    string      // chat
	Vectors [][]float32 // embeddings, by input index
	Media   []byte      // image bytes as sent
	// Trusted marks a reference answer (this node's own worker): others
	// are judged against it instead of by majority.
	Trusted bool

	hash   uint64 // of Media, once decoded
	hashOK bool
}

// ErrImage is returned for media that is not a decodable image.
var ErrImage = errors.New("canary: not a decodable image")

// prepare computes what comparing needs once per answer.
func (a *Answer) prepare(t pb.QueryType) {
	if t == pb.QueryType_QUERY_TYPE_IMAGINE {
		h, err := DHash(a.Media)
		a.hash, a.hashOK = h, err == nil
	}
}

// Agree reports whether a and b agree as answers of type t.
func (th Thresholds) Agree(t pb.QueryType, a, b *Answer) bool {
	switch t {
	case pb.QueryType_QUERY_TYPE_EMBED:
		if len(a.Vectors) != len(b.Vectors) || len(a.Vectors) == 0 {
			return false
		}
		for i := range a.Vectors {
			if Cosine(a.Vectors[i], b.Vectors[i]) < th.Cosine {
				return false
			}
		}
		return true
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		return a.hashOK && b.hashOK && bits.OnesCount64(a.hash^b.hash) <= th.HashDistance
	}
	return PrefixAgreement(a.Text, b.Text, th.PrefixTokens) >= th.PrefixAgree
}

// Tokens splits s into words and single punctuation marks, an
// approximation of a model's tokens that needs no tokenizer and does not
// depend on how a worker cut its stream into chunks.
func Tokens(s string, limit int) []string {
	var out []string
	start := -1
	flush := func(end int) {
		if start >= 0 {
			out = append(out, s[start:end])
			start = -1
		}
	}
	for i, r := range s {
		if len(out) >= limit {
			return out[:limit]
		}
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r):
			if start < 0 {
				start = i
			}
		case unicode.IsSpace(r):
			flush(i)
		default:
			flush(i)
			out = append(out, string(r))
		}
	}
	flush(len(s))
	if len(out) > limit {
		out = out[:limit]
	}
	return out
}

// PrefixAgreement is the length of the common token prefix of a and b
// over the first n tokens of the longer one: 1 when they start alike
// for n tokens (or are equal), 0 when their first tokens differ.
func PrefixAgreement(a, b string, n int) float64 {
	ta, tb := Tokens(a, n), Tokens(b, n)
	longer := max(len(ta), len(tb))
	if longer == 0 {
		return 1
	}
	common := 0
	for common < len(ta) && common < len(tb) && ta[common] == tb[common] {
		common++
	}
	return float64(common) / float64(longer)
}

// Cosine is the cosine similarity of a and b; 0 when their lengths differ
// or either is zero.
func Cosine(a, b []float32) float64 {
	if len(a) != len(b) || len(a) == 0 {
		return 0
	}
	var dot, na, nb float64
	for i := range a {
		x, y := float64(a[i]), float64(b[i])
		dot += x * y
		na += x * x
		nb += y * y
	}
	if na == 0 || nb == 0 || math.IsNaN(dot) {
		return 0
	}
	return dot / math.Sqrt(na*nb)
}

// DHash is the 64-bit difference hash of an image: the picture shrunk to
// 9×8 grey cells, one bit per pair of neighbours saying which is
// brighter. Re-encoding, resizing and small numeric drift leave it nearly
// unchanged; another picture changes about half its bits.
func DHash(data []byte) (uint64, error) {
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrImage, err)
	}
	b := img.Bounds()
	if b.Dx() < 1 || b.Dy() < 1 {
		return 0, fmt.Errorf("%w: empty", ErrImage)
	}
	var grey [8][9]float64
	for y := 0; y < 8; y++ {
		for x := 0; x < 9; x++ {
			grey[y][x] = cellMean(img, b, x, y)
		}
	}
	var h uint64
	for y := 0; y < 8; y++ {
		for x := 0; x < 8; x++ {
			h <<= 1
			if grey[y][x] > grey[y][x+1] {
				h |= 1
			}
		}
	}
	return h, nil
}

// cellMean is the mean luminance of cell (cx, cy) of a 9×8 grid over b,
// sampled at most 8×8 times so that a huge image costs no more.
func cellMean(img image.Image, b image.Rectangle, cx, cy int) float64 {
	x0, x1 := b.Min.X+cx*b.Dx()/9, b.Min.X+(cx+1)*b.Dx()/9
	y0, y1 := b.Min.Y+cy*b.Dy()/8, b.Min.Y+(cy+1)*b.Dy()/8
	x1, y1 = max(x1, x0+1), max(y1, y0+1)
	sx, sy := max((x1-x0)/8, 1), max((y1-y0)/8, 1)
	var sum float64
	n := 0
	for y := y0; y < y1 && y < b.Max.Y; y += sy {
		for x := x0; x < x1 && x < b.Max.X; x += sx {
			r, g, bl, _ := img.At(x, y).RGBA()
			sum += 0.299*float64(r) + 0.587*float64(g) + 0.114*float64(bl)
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return sum / float64(n)
}

// Judge decides which answers agree with the rest. With a trusted answer
// each other answer is judged against it. Otherwise the answer agreeing
// with the most others and those agreeing with it form the majority, if
// they are more than half of at least minVoters answers; each answer is
// then with it or not. ok is false when nothing can be concluded.
func (th Thresholds) Judge(t pb.QueryType, answers []*Answer, minVoters int) (agreed []bool, ok bool) {
	for _, a := range answers {
		a.prepare(t)
	}
	agreed = make([]bool, len(answers))
	for _, ref := range answers {
		if !ref.Trusted {
			continue
		}
		if len(answers) < 2 {
			return nil, false
		}
		for i, a := range answers {
			agreed[i] = a == ref || th.Agree(t, ref, a)
		}
		return agreed, true
	}
	n := len(answers)
	if n < minVoters || n < 3 {
		return nil, false
	}
	best, bestCount := -1, -1
	agree := make([][]bool, n)
	for i := range answers {
		agree[i] = make([]bool, n)
	}
	for i := 0; i < n; i++ {
		for j := i + 1; j < n; j++ {
			v := th.Agree(t, answers[i], answers[j])
			agree[i][j], agree[j][i] = v, v
		}
	}
	for i := 0; i < n; i++ {
		c := 0
		for j := 0; j < n; j++ {
			if agree[i][j] {
				c++
			}
		}
		if c > bestCount {
			best, bestCount = i, c
		}
	}
	if 2*(bestCount+1) <= n {
		return nil, false
	}
	for i := range answers {
		agreed[i] = i == best || agree[best][i]
	}
	return agreed, true
}
