package backendtest

import (
	"slices"
	"testing"
)

func TestSinkRecords(t *testing.T) {
	var seen []int
	s := Sink{OnChunk: func(n int) { seen = append(seen, n) }}
	for _, c := range []string{"he", "llo"} {
		if err := s.Chunk(c); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Media("image/png", []byte("P")); err != nil {
		t.Fatal(err)
	}
	if err := s.Embedding(1, []float32{0.5}); err != nil {
		t.Fatal(err)
	}
	if s.Text() != "hello" || !slices.Equal(seen, []int{1, 2}) || !slices.Equal(s.Mimes(), []string{"image/png"}) ||
		string(s.MediaData()[0]) != "P" || s.Embeddings()[1][0] != 0.5 {
		t.Fatalf("text %q, OnChunk saw %v, media %v %q, embeddings %v", s.Text(), seen, s.Mimes(), s.MediaData(), s.Embeddings())
	}
	// What the accessors return is a copy.
	s.Chunks()[0] = "x"
	if s.Text() != "hello" {
		t.Errorf("Chunks shares the sink's slice")
	}
	strict := Sink{RefuseEmbeddings: true}
	if err := strict.Embedding(0, nil); err == nil || len(strict.Embeddings()) != 0 {
		t.Errorf("RefuseEmbeddings: err %v, recorded %v", err, strict.Embeddings())
	}
}
