package canary

import (
	"fmt"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

func TestBookLiarFallsHonestStays(t *testing.T) {
	tests := []struct {
		name       string
		verdicts   []bool
		wantScore  float64
		distrusted bool
	}{
		{"never checked", nil, 100, false},
		{"honest", []bool{true, true, true}, 100, false},
		{"one unlucky miss", []bool{true, false, true}, 80, false},
		{"liar, two canaries", []bool{false, false}, 50, false},
		{"liar, three canaries", []bool{false, false, false}, 25, true},
		{"liar earning its way back", []bool{false, false, false, true, true, true}, 40, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBook()
			p := peer.ID("p")
			for _, v := range tc.verdicts {
				b.Record(p, v)
			}
			if got := b.Score(p); got != tc.wantScore || b.Distrusted(p) != tc.distrusted {
				t.Fatalf("score %v distrusted %v, want %v %v", got, b.Distrusted(p), tc.wantScore, tc.distrusted)
			}
		})
	}
}

// TestBookBounded: a full book forgets trusted peers first, never a
// distrusted one while a trusted one is left.
func TestBookBounded(t *testing.T) {
	b := NewBook(WithMaxPeers(8))
	liar := peer.ID("liar")
	for i := 0; i < 3; i++ {
		b.Record(liar, false)
	}
	for i := 0; i < 100; i++ {
		b.Record(peer.ID(fmt.Sprintf("honest-%d", i)), true)
	}
	if b.Len() != 8 {
		t.Fatalf("book holds %d peers, bound 8", b.Len())
	}
	if !b.Distrusted(liar) {
		t.Fatal("the liar was forgotten while trusted peers were kept")
	}
}
