package discovery

import (
	"context"
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
// keeps the last accepted seq per author in a bounded LRU so that a replayed
// or reordered older announcement is ignored.
type announceValidator struct {
	now func() time.Time

	mu      sync.Mutex
	lastSeq *lru.Cache[peer.ID, uint64]
}

func newAnnounceValidator(size int, now func() time.Time) *announceValidator {
	c, err := lru.New[peer.ID, uint64](size)
	if err != nil {
		// Only a non-positive size fails, which the options exclude.
		panic(err)
	}
	return &announceValidator{now: now, lastSeq: c}
}

// check judges one announcement from author. Reject (peer penalised) is
// for what no honest peer sends: bytes that are not an Announce, an
// oversized one, a future date or an invalid field. Ignore (no penalty) is
// for what an honest peer can cause: a stale seq, or an announcement that
// expired in transit. The error says why, for logs and tests.
func (v *announceValidator) check(author peer.ID, data []byte) (pubsub.ValidationResult, *pb.Announce, error) {
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
	if err := protocol.ValidateAnnounce(a, now); err != nil {
		return pubsub.ValidationReject, nil, fmt.Errorf("invalid announce: %w", err)
	}
	ttl := time.Duration(a.GetTtlMs()) * time.Millisecond
	if expiry := time.UnixMilli(a.GetTimeUnixMs()).Add(ttl + protocol.MaxClockSkew); expiry.Before(now) {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("announce expired %s ago", now.Sub(expiry).Round(time.Millisecond))
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if last, ok := v.lastSeq.Get(author); ok && a.GetSeq() <= last {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("stale announce seq %d, have %d", a.GetSeq(), last)
	}
	v.lastSeq.Add(author, a.GetSeq())
	return pubsub.ValidationAccept, a, nil
}

// validate is the pubsub.ValidatorEx. The author is the signed From field,
// not the forwarding peer: with StrictSign, pubsub has verified that the
// author's key signed the message before calling us.
func (v *announceValidator) validate(_ context.Context, from peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	res, a, err := v.check(msg.GetFrom(), msg.GetData())
	if err != nil {
		log.Debugw("announce not accepted", "author", msg.GetFrom(), "from", from, "result", resultName(res), "err", err)
		return res
	}
	// Hand the decoded message to the subscription, saving a second decode.
	msg.ValidatorData = a
	return res
}

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
