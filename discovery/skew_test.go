package discovery

import (
	"sync/atomic"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"
)

// skewedClock is a node's clock, off this machine's by an offset the test
// changes while the node runs: a process's own clock cannot be set apart
// from the machine's (Go reads it from the vDSO).
type skewedClock struct{ off atomic.Int64 }

func (c *skewedClock) now() time.Time { return time.Now().Add(time.Duration(c.off.Load())) }

func withClock(now func() time.Time) Option {
	return func(c *config) error { c.now = now; return nil }
}

// TestClockBehindPenalisesNoOne: a worker whose clock runs 45 s behind its
// peers' sees their announcements dated 45 s ahead and refuses them. It
// cannot tell whose clock is wrong, so it must not penalise the honest
// peers that delivered them: its own announcements, which the peers accept
// (45 s old is within the TTL and the skew), keep reaching them, so it
// stays routable; and once its clock is set right it sees their workers at
// once, not after a graylisting has decayed. Over TCP and QUIC.
func TestClockBehindPenalisesNoOne(t *testing.T) {
	const every = 100 * time.Millisecond
	clock := new(skewedClock)
	clock.off.Store(int64(-45 * time.Second))
	scores := make(scoreWatch, 1)
	hw, ha, hb := newHost(t), newHost(t), newHost(t)
	w := newDiscovery(t, hw, withClock(clock.now), scores.option())
	a := newDiscovery(t, ha, WithBootstrap([]peer.AddrInfo{info(hw)}))
	b := newDiscovery(t, hb, WithBootstrap([]peer.AddrInfo{info(hw)}))
	heartbeat(t, w, "behind", every)
	heartbeat(t, a, "a", every)
	heartbeat(t, b, "b", every)
	for _, d := range []*Discovery{a, b} {
		waitTable(t, d, "the worker whose clock is behind", func(es []Entry) bool { return has(es, hw.ID()) })
	}

	// Three refusals would graylist a peer were each a Reject; this is
	// many times that.
	until := time.Now().Add(3 * time.Second)
	for time.Now().Before(until) {
		m := <-scores
		for _, p := range []peer.ID{ha.ID(), hb.ID()} {
			if m[p] < 0 {
				t.Fatalf("the node whose clock is behind scores honest peer %s at %.1f", p, m[p])
			}
		}
	}
	if tr := w.Traffic(); tr.Ignored < 20 || tr.Rejected != 0 {
		t.Fatalf("the node whose clock is behind counted %d ignored and %d rejected, want ≥ 20 ignored and none rejected", tr.Ignored, tr.Rejected)
	}
	if es := w.Table().Snapshot(); has(es, ha.ID()) || has(es, hb.ID()) {
		t.Fatalf("a clock 45 s behind accepted announcements dated 45 s ahead: %v", es)
	}
	// Its announcements still reach its peers: the entry a holds keeps
	// being renewed.
	first, _ := a.Table().Get(hw.ID())
	waitTable(t, a, "newer announcements of the worker whose clock is behind", func([]Entry) bool {
		e, ok := a.Table().Get(hw.ID())
		return ok && e.Announce.GetSeq() >= first.Announce.GetSeq()+5
	})

	clock.off.Store(0)
	fixed := time.Now()
	waitTable(t, w, "its peers' workers once its clock is right", func(es []Entry) bool { return has(es, ha.ID()) && has(es, hb.ID()) })
	if took := time.Since(fixed); took > 5*time.Second {
		t.Fatalf("its peers' workers took %s to show once its clock was right: it had penalised them", took)
	}
}

// Announcements and catalogues dated ahead are ignored, but an author that
// delivers them itself still pays for each from its allowance: beyond it
// they are rejected (penalised), as its flood of valid ones would be. A
// forwarder relaying them spends nothing of the author's allowance and is
// never penalised.
func TestFutureDatedStillPaysItsAllowance(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	ahead := now.Add(time.Hour)
	const sent = 3 * DefaultAnnounceBurst
	for _, tc := range []struct {
		name      string
		forwarded bool
		catalog   bool
	}{
		{"announce, from its author", false, false},
		{"announce, forwarded", true, false},
		{"catalog, from its author", false, true},
		{"catalog, forwarded", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			author := testPeerID(t)
			from := author
			if tc.forwarded {
				from = testPeerID(t)
			}
			v := newAnnounceValidator(16, func() time.Time { return now })
			cat := newCatalog(testCatalogEvery)
			burst := DefaultAnnounceBurst
			if tc.catalog {
				burst = catalogBurst
			}
			var ignored, rejected int
			for i := range sent {
				var res pubsub.ValidationResult
				if tc.catalog {
					c := validCatalog("m")
					c.TimeUnixMs = ahead.Add(time.Duration(i) * time.Millisecond).UnixMilli()
					data, _ := proto.Marshal(c)
					res, _, _ = cat.check(author, from, data, now)
				} else {
					res, _, _ = v.check(author, from, marshal(t, validAnnounce(ahead, uint64(i+1))))
				}
				switch res {
				case pubsub.ValidationIgnore:
					ignored++
				case pubsub.ValidationReject:
					rejected++
				default:
					t.Fatalf("message %d accepted", i)
				}
			}
			want := sent
			if !tc.forwarded {
				want = burst
			}
			if ignored != want || rejected != sent-want {
				t.Fatalf("%d ignored and %d rejected of %d, want %d ignored", ignored, rejected, sent, want)
			}
		})
	}
}
