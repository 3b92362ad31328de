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

// TestValidatorNoticesAClockOff: three peers' announcements dated two
// minutes ahead of this node's clock (refused, without a penalty: its
// clock is behind), or
// 45 s behind it (accepted, but the peers refuse this node's: its clock
// is ahead), make the validator's clock watch warn; the same peers'
// announcements replayed minutes later (a stale seq) do not.
func TestValidatorNoticesAClockOff(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	for _, tc := range []struct {
		name   string
		dated  time.Duration // from now
		replay bool          // each announcement accepted first, at its date
		want   pubsub.ValidationResult
		warn   bool
	}{
		{"dated 2 min ahead", 2 * time.Minute, false, pubsub.ValidationIgnore, true},
		{"dated 45 s behind", -45 * time.Second, false, pubsub.ValidationAccept, true},
		{"replayed 3 min later", -3 * time.Minute, true, pubsub.ValidationIgnore, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := now
			v := newAnnounceValidator(16, func() time.Time { return clock })
			for i := range 3 {
				author := testPeerID(t)
				data := marshal(t, validAnnounce(now.Add(tc.dated), uint64(i+1)))
				if tc.replay {
					clock = now.Add(tc.dated)
					if res, _, err := v.check(author, author, data); res != pubsub.ValidationAccept {
						t.Fatalf("the announcement at its date: %v, %v", res, err)
					}
					clock = now
				}
				if res, _, err := v.check(author, author, data); res != tc.want {
					t.Fatalf("announcement %d: %v (%v), want %v", i, res, err, tc.want)
				}
			}
			if warned := !v.clock.warned.IsZero(); warned != tc.warn {
				t.Fatalf("warned %v, want %v", warned, tc.warn)
			}
		})
	}
}
