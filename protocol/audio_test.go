package protocol_test

import (
	"testing"

	"github.com/mtor-swarm/mtor/protocol"
)

func TestAudioJoinsPiecesOfOneType(t *testing.T) {
	for _, tc := range []struct {
		name   string
		pieces [][2]string // mime, data
		want   string
		ok     bool
	}{
		{"one piece", [][2]string{{"audio/mpeg", "abc"}}, "abc", true},
		{"three pieces", [][2]string{{"audio/mpeg", "ab"}, {"audio/mpeg", "cd"}, {"audio/mpeg", "e"}}, "abcde", true},
		{"another type", [][2]string{{"audio/mpeg", "ab"}, {"audio/wav", "cd"}}, "ab", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var a protocol.Audio
			ok := true
			for _, p := range tc.pieces {
				ok = a.Add(p[0], []byte(p[1])) && ok
			}
			if ok != tc.ok || string(a.Data) != tc.want || a.Mime != tc.pieces[0][0] {
				t.Fatalf("Add ok %v, audio %q of %q; want ok %v, %q", ok, a.Data, a.Mime, tc.ok, tc.want)
			}
		})
	}
	// The audio's bytes are its own: a piece's buffer reused later (a
	// frame reader's) does not change it.
	buf := []byte("xyz")
	var a protocol.Audio
	a.Add("audio/mpeg", buf)
	copy(buf, "!!!")
	if string(a.Data) != "xyz" {
		t.Fatalf("audio %q changed with the piece's buffer", a.Data)
	}
}
