package discovery

import (
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// TestClockWatch: one peer dated off says nothing of this machine's
// clock; three within a minute, off the same way, do, once per ten
// minutes; peers off both ways, or spread over more than a minute, do
// not.
func TestClockWatch(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	type seen struct {
		author string
		off    time.Duration
		at     time.Duration // after t0
		warn   bool
	}
	for _, tc := range []struct {
		name   string
		seen   []seen
		median time.Duration // of the last warning
	}{
		{"one peer, again and again", []seen{{"a", time.Hour, 0, false}, {"a", time.Hour, time.Second, false}, {"a", time.Hour, 2 * time.Second, false}}, 0},
		{"three peers ahead", []seen{{"a", 2 * time.Minute, 0, false}, {"b", 3 * time.Minute, time.Second, false}, {"c", 4 * time.Minute, 2 * time.Second, true}}, 3 * time.Minute},
		{"three behind, a fourth: one warning", []seen{{"a", -time.Minute, 0, false}, {"b", -time.Minute, 0, false}, {"c", -2 * time.Minute, 0, true}, {"d", -time.Minute, time.Second, false}}, -time.Minute},
		{"both ways", []seen{{"a", 2 * time.Minute, 0, false}, {"b", -2 * time.Minute, 0, false}, {"c", 2 * time.Minute, 0, false}}, 0},
		{"spread over more than a minute", []seen{{"a", time.Hour, 0, false}, {"b", time.Hour, 40 * time.Second, false}, {"c", time.Hour, 81 * time.Second, false}}, 0},
		{"warned again after ten minutes", []seen{{"a", time.Hour, 0, false}, {"b", time.Hour, 0, false}, {"c", time.Hour, 0, true},
			{"a", time.Hour, 5 * time.Minute, false}, {"b", time.Hour, 5 * time.Minute, false}, {"c", time.Hour, 5 * time.Minute, false},
			{"a", time.Hour, 11 * time.Minute, false}, {"b", time.Hour, 11 * time.Minute, false}, {"c", time.Hour, 11 * time.Minute, true}}, time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w clockWatch
			var median time.Duration
			for i, s := range tc.seen {
				warn, _, m := w.note(peer.ID(s.author), s.off, t0.Add(s.at))
				if warn != s.warn {
					t.Fatalf("announcement %d (%s, %s off): warn %v, want %v", i, s.author, s.off, warn, s.warn)
				}
				if warn {
					median = m
				}
			}
			if median != tc.median {
				t.Fatalf("median offset %s, want %s", median, tc.median)
			}
		})
	}
}

// TestValidatorNoticesAClockBehind: announcements of three peers dated
// two minutes ahead of this node's clock (its clock behind theirs) are
// rejected, and the validator's clock watch has warned.
func TestValidatorNoticesAClockBehind(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	v := newAnnounceValidator(16, func() time.Time { return now })
	for i := range 3 {
		author := testPeerID(t)
		res, _, err := v.check(author, author, marshal(t, validAnnounce(now.Add(2*time.Minute), uint64(i+1))))
		if res != pubsub.ValidationReject || err == nil {
			t.Fatalf("announcement dated 2 min ahead: %v, %v; want rejected", res, err)
		}
	}
	if v.clock.warned.IsZero() {
		t.Fatal("no warning after three peers' announcements dated 2 min ahead")
	}
}
