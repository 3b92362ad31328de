package discovery

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// announceValidator is the gossipsub validator of the announce topic. It
// keeps, per author in bounded LRUs, the last accepted seq (so that a
// replayed or reordered older announcement is ignored) and a token bucket
// (so that an author cannot flood the topic).
type announceValidator struct {
	now   func() time.Time
	every time.Duration // one token per every
	burst float64
	// keep, when set, says whether the table would keep a new author's
	// announcement delivered by from; what it would drop is ignored
	// rather than forwarded.
	keep func(author, from peer.ID, a *pb.Announce) bool

	mu      sync.Mutex
	lastSeq *lru.Cache[peer.ID, uint64]
	buckets *lru.Cache[peer.ID, bucket]
	clock   clockWatch
}

// bucket is a token bucket: tokens at time at.
type bucket struct {
	tokens float64
	at     time.Time
}

func newAnnounceValidator(size int, now func() time.Time) *announceValidator {
	c, err := lru.New[peer.ID, uint64](size)
	if err != nil {
		// Only a non-positive size fails, which the options exclude.
		panic(err)
	}
	b, _ := lru.New[peer.ID, bucket](size)
	return &announceValidator{now: now, lastSeq: c, buckets: b, every: DefaultAnnounceEvery, burst: DefaultAnnounceBurst}
}

// take spends one of author's tokens at now, reporting false when it has
// none left. v.mu is held.
func (v *announceValidator) takeLocked(author peer.ID, now time.Time) bool {
	b, ok := v.buckets.Get(author)
	if !ok {
		b = bucket{tokens: v.burst, at: now}
	}
	if el := now.Sub(b.at); el > 0 {
		b.tokens = min(v.burst, b.tokens+float64(el)/float64(v.every))
		b.at = now
	}
	if b.tokens < 1 {
		v.buckets.Add(author, b)
		return false
	}
	b.tokens--
	v.buckets.Add(author, b)
	return true
}

// check judges one announcement from author delivered by from. Reject
// (from penalised) is for what no honest peer sends: bytes that are not an
// Announce, an oversized one, an invalid field, or an author announcing
// too often straight to us. Ignore (no penalty) is for what an honest peer
// can cause: a date too far ahead of this clock (this clock may be the one
// behind), a stale seq, an announcement that expired in transit, too
// frequent announcements of someone else that it forwarded, or one the
// table has no room for. The error says why, for logs and tests.
func (v *announceValidator) check(author, from peer.ID, data []byte) (pubsub.ValidationResult, *pb.Announce, error) {
	if author == "" {
		return pubsub.ValidationReject, nil, fmt.Errorf("announce without an author")
	}
	if len(data) > protocol.MaxAnnounce {
		return pubsub.ValidationReject, nil, fmt.Errorf("announce of %d bytes, limit %d", len(data), protocol.MaxAnnounce)
	}
	a := new(pb.Announce)
	if err := proto.Unmarshal(data, a); err != nil {
		return pubsub.ValidationReject, nil, fmt.Errorf("malformed announce: %w", err)
	}
	now := v.now()
	dated := time.UnixMilli(a.GetTimeUnixMs())
	// Dated more than the skew allowed from this clock, either way: ahead,
	// this node refuses it; behind, the author refuses this node's own (or
	// it expired). Either says one of the two clocks is off.
	off := dated.Sub(now)
	judgeAt, ahead := aheadOf(dated, now)
	if err := protocol.ValidateAnnounce(a, judgeAt); err != nil {
		return pubsub.ValidationReject, nil, fmt.Errorf("invalid announce: %w", err)
	}
	if ahead {
		// Refused, not penalised: this node cannot tell whose clock is
		// wrong, and a node whose own clock is behind would otherwise
		// graylist every honest peer, cutting itself off from the gossip
		// that carries its own announcements out. An author delivering
		// them itself still pays for each from its allowance, so that it
		// cannot send them without end at no cost; a forwarder does not
		// spend the author's.
		v.offClock(author, off, now)
		res, err := refuseAhead(author, from, func() bool {
			v.mu.Lock()
			defer v.mu.Unlock()
			return v.takeLocked(author, now)
		}, fmt.Errorf("%w: %s ahead of this clock", errFuture, off.Round(time.Millisecond)))
		return res, nil, err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	last, seen := v.lastSeq.Get(author)
	replayed := seen && a.GetSeq() <= last
	if off < -protocol.MaxClockSkew && !replayed { // a replay's date says nothing of the clocks
		v.offClock(author, off, now)
	}
	ttl := time.Duration(a.GetTtlMs()) * time.Millisecond
	if expiry := dated.Add(ttl + protocol.MaxClockSkew); expiry.Before(now) {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("announce expired %s ago", now.Sub(expiry).Round(time.Millisecond))
	}
	if replayed {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("stale announce seq %d, have %d", a.GetSeq(), last)
	}
	if !v.takeLocked(author, now) {
		// A forwarder may have seen fewer of the author's messages, or
		// seen them spaced out: only the author itself is to blame.
		if from == author {
			return pubsub.ValidationReject, nil, errTooFrequent
		}
		return pubsub.ValidationIgnore, nil, errTooFrequent
	}
	if v.keep != nil && !v.keep(author, from, a) {
		return pubsub.ValidationIgnore, nil, errNoRoom
	}
	v.lastSeq.Add(author, a.GetSeq())
	return pubsub.ValidationAccept, a, nil
}

// aheadOf reports whether a message dated at dated is further ahead of now
// than the skew allowed, and the time to judge the rest of it at: its own
// date then, so that what is invalid at any date is still Reject.
func aheadOf(dated, now time.Time) (judgeAt time.Time, ahead bool) {
	if dated.Sub(now) > protocol.MaxClockSkew {
		return dated, true
	}
	return now, false
}

// refuseAhead is the verdict on a valid message dated too far ahead:
// Ignore (why), but Reject when its author delivered it itself and take,
// which spends one of the author's tokens, finds none left.
func refuseAhead(author, from peer.ID, take func() bool, why error) (pubsub.ValidationResult, error) {
	if from == author && !take() {
		return pubsub.ValidationReject, errTooFrequent
	}
	return pubsub.ValidationIgnore, why
}

// offClock notes an announcement of author dated more than the skew
// allowed off this clock, and warns when several authors are.
func (v *announceValidator) offClock(author peer.ID, off time.Duration, now time.Time) {
	if warn, n, median := v.clock.note(author, off, now); warn {
		// Ahead of this clock: this node refuses the swarm's
		// announcements and sees no workers. Behind it: the swarm
		// refuses this node's, and routes nothing to it.
		way, effect := "behind", "its peers ignore this node's announcements and route no queries to it"
		if median > 0 {
			way, effect = "ahead of", "this node ignores its peers' announcements and sees none of their workers"
		}
		log.Warnw(fmt.Sprintf("announcements of %d peers within a minute were dated about %s %s this machine's clock: is its clock right (NTP)? "+
			"Nodes ignore announcements dated more than %s ahead of their clocks, so %s",
			n, median.Abs().Round(time.Second), way, protocol.MaxClockSkew, effect), "peers", n, "median_offset", median.Round(time.Millisecond).String())
	}
}

// validate is the pubsub.ValidatorEx. The author is the signed From field,
// not the forwarding peer: with StrictSign, pubsub has verified that the
// author's key signed the message before calling us.
func (v *announceValidator) validate(_ context.Context, from peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	res, a, err := v.check(msg.GetFrom(), from, msg.GetData())
	if err != nil {
		log.Debugw("announce not accepted", "author", msg.GetFrom(), "from", from, "result", resultName(res), "err", err)
		return res
	}
	// Hand the decoded message to the subscription, saving a second decode.
	msg.ValidatorData = a
	return res
}

// validate is the announce topic's validator: in a closed swarm, what a
// non-member delivers and what a revoked peer wrote is ignored first.
func (d *Discovery) validate(ctx context.Context, from peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	if from == d.h.ID() && msg.GetFrom() == d.h.ID() {
		// Our own publish, checked by Publish, which sends one
		// announcement (one seq) on several topics: the seq check
		// would refuse all but the first.
		a := new(pb.Announce)
		if err := proto.Unmarshal(msg.GetData(), a); err != nil {
			return pubsub.ValidationReject
		}
		msg.ValidatorData = a
		return pubsub.ValidationAccept
	}
	if m := d.cfg.members; m != nil && from != d.h.ID() {
		if !m.IsMember(from) || m.Revoked(msg.GetFrom()) {
			log.Debugw("announce ignored: not from a swarm member", "author", msg.GetFrom(), "from", from)
			return pubsub.ValidationIgnore
		}
	}
	return d.val.validate(ctx, from, msg)
}

// Reasons of the validator, for errors.Is in tests.
var (
	errTooFrequent = errors.New("announcing too often")
	errFuture      = errors.New("dated in the future")
	errNoRoom      = errors.New("no room: quarantine full for the forwarding peer, or enough workers of its models kept")
)

func resultName(r pubsub.ValidationResult) string {
	switch r {
	case pubsub.ValidationAccept:
		return "accept"
	case pubsub.ValidationReject:
		return "reject"
	case pubsub.ValidationIgnore:
		return "ignore"
	}
	return "unknown"
}
