package canary

import (
	"bytes"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"math/bits"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestPrefixAgreement(t *testing.T) {
	tests := []struct {
		name string
		a, b string
		want float64
	}{
		{"equal", "The sky is blue because of Rayleigh scattering.", "The sky is blue because of Rayleigh scattering.", 1},
		{"chunking and spacing do not matter", "The sky  is blue,because", "The sky is blue , because", 1},
		{"drift after half", "a b c d e f g h", "a b c d w x y z", 0.5},
		{"different from the start", "Bonjour tout le monde", "Hello world", 0},
		{"both empty", "", "", 1},
		{"one empty", "", "text", 0},
		{"beyond the compared tokens", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 a", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 b", 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := PrefixAgreement(tc.a, tc.b, 16); got != tc.want {
				t.Fatalf("PrefixAgreement(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.want)
			}
		})
	}
}

func TestCosine(t *testing.T) {
	tests := []struct {
		name string
		a, b []float32
		lo   float64
		hi   float64
	}{
		{"same", []float32{1, 2, 3}, []float32{1, 2, 3}, 0.9999, 1.0001},
		{"scaled", []float32{1, 2, 3}, []float32{2, 4, 6}, 0.9999, 1.0001},
		{"orthogonal", []float32{1, 0}, []float32{0, 1}, -0.0001, 0.0001},
		{"opposite", []float32{1, 1}, []float32{-1, -1}, -1.0001, -0.9999},
		{"lengths differ", []float32{1, 2}, []float32{1, 2, 3}, 0, 0},
		{"zero vector", []float32{0, 0}, []float32{1, 2}, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Cosine(tc.a, tc.b); got < tc.lo || got > tc.hi {
				t.Fatalf("Cosine = %v, want in [%v, %v]", got, tc.lo, tc.hi)
			}
		})
	}
}

// picture draws a smooth scene picked by kind, at size n.
func picture(kind, n int) image.Image {
	img := image.NewRGBA(image.Rect(0, 0, n, n))
	for y := 0; y < n; y++ {
		for x := 0; x < n; x++ {
			v := uint8(x * 255 / n)
			if kind == 1 {
				v = 255 - v
			}
			if kind == 2 && (x/(n/4)+y/(n/4))%2 == 0 {
				v = 255 - v
			}
			img.Set(x, y, color.RGBA{v, v / 2, 255 - v, 255})
		}
	}
	return img
}

func encode(t *testing.T, img image.Image, asJPEG bool) []byte {
	t.Helper()
	var buf bytes.Buffer
	var err error
	if asJPEG {
		err = jpeg.Encode(&buf, img, &jpeg.Options{Quality: 70})
	} else {
		err = png.Encode(&buf, img)
	}
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestDHash(t *testing.T) {
	ref, err := DHash(encode(t, picture(2, 256), false))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		data    []byte
		near    bool // within DefaultHashDistance of ref
		wantErr bool
	}{
		{"same picture re-encoded as JPEG", encode(t, picture(2, 256), true), true, false},
		{"same picture at another size", encode(t, picture(2, 128), false), true, false},
		{"another picture", encode(t, picture(1, 256), false), false, false},
		{"a third picture", encode(t, picture(0, 256), false), false, false},
		{"not an image", []byte("random bytes, not a picture"), false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := DHash(tc.data)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			d := bits.OnesCount64(h ^ ref)
			if (d <= DefaultHashDistance) != tc.near {
				t.Fatalf("distance %d bits, want near=%v", d, tc.near)
			}
		})
	}
}

func TestJudge(t *testing.T) {
	chat := func(texts ...string) []*Answer {
		var out []*Answer
		for _, s := range texts {
			out = append(out, &Answer{Text: s})
		}
		return out
	}
	honest := "Rayleigh scattering makes short blue wavelengths scatter more than red ones"
	drift := "Rayleigh scattering makes short blue wavelengths scatter far more widely"
	lie := "As an AI I think pizza is the best food in the whole world really"
	tests := []struct {
		name    string
		answers []*Answer
		ok      bool
		agreed  []bool
	}{
		{"liar among three", chat(honest, lie, honest), true, []bool{true, false, true}},
		{"honest drift is no lie", chat(honest, drift, honest), true, []bool{true, true, true}},
		{"two liars of five", chat(lie+" a", honest, honest, "zzz yyy", honest), true, []bool{false, true, true, false, true}},
		{"no majority", chat(honest, lie, "zzz yyy"), false, nil},
		{"two answers are too few", chat(honest, lie), false, nil},
		{"trusted reference decides", []*Answer{{Text: honest, Trusted: true}, {Text: lie}}, true, []bool{true, false}},
		{"trusted reference outvotes a colluding pair", []*Answer{{Text: honest, Trusted: true}, {Text: lie}, {Text: lie}}, true, []bool{true, false, false}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agreed, ok := DefaultThresholds().Judge(pb.QueryType_QUERY_TYPE_CHAT, tc.answers, DefaultMinVoters)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			for i := range tc.agreed {
				if agreed[i] != tc.agreed[i] {
					t.Fatalf("agreed = %v, want %v", agreed, tc.agreed)
				}
			}
		})
	}
	embed := []*Answer{
		{Vectors: [][]float32{{1, 0, 0}}}, {Vectors: [][]float32{{0.99, 0.01, 0}}}, {Vectors: [][]float32{{0, 1, 0}}},
	}
	agreed, ok := DefaultThresholds().Judge(pb.QueryType_QUERY_TYPE_EMBED, embed, 3)
	if !ok || !agreed[0] || !agreed[1] || agreed[2] {
		t.Fatalf("embeddings: agreed %v ok %v, want [true true false]", agreed, ok)
	}
	img := []*Answer{
		{Media: encode(t, picture(2, 64), false)}, {Media: encode(t, picture(2, 64), true)}, {Media: encode(t, picture(1, 64), false)},
	}
	agreed, ok = DefaultThresholds().Judge(pb.QueryType_QUERY_TYPE_IMAGINE, img, 3)
	if !ok || !agreed[0] || !agreed[1] || agreed[2] {
		t.Fatalf("images: agreed %v ok %v, want [true true false]", agreed, ok)
	}
}
