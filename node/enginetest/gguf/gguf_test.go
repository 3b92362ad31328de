package gguf

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// TestHeader checks the fixed header and that the output is deterministic
// for a seed and padded to the alignment.
func TestHeader(t *testing.T) {
	var a, b bytes.Buffer
	if err := Write(&a, Config{}); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, Config{}); err != nil {
		t.Fatal(err)
	}
	data := a.Bytes()
	if string(data[:4]) != "GGUF" || binary.LittleEndian.Uint32(data[4:]) != 3 {
		t.Fatalf("header = %q v%d", data[:4], binary.LittleEndian.Uint32(data[4:]))
	}
	if n := binary.LittleEndian.Uint64(data[8:]); n != 3+2*9 {
		t.Errorf("tensor count = %d, want 21 for 2 layers", n)
	}
	if len(data)%alignment != 0 {
		t.Errorf("length %d not a multiple of %d", len(data), alignment)
	}
	if !bytes.Equal(data, b.Bytes()) {
		t.Error("two writes with the same config differ")
	}
}

func TestConfigValidation(t *testing.T) {
	for _, c := range []Config{
		{Embed: 60},
		{Heads: 3},
		{Layers: 100},
		{FeedForward: 7},
		{ContextLength: 10},
	} {
		if err := Write(&bytes.Buffer{}, c); err == nil {
			t.Errorf("Write(%+v) succeeded, want an error", c)
		}
	}
}
