package discovery

import (
	"strings"
	"testing"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func validAnnounce(now time.Time, seq uint64) *pb.Announce {
	return &pb.Announce{
		Seq:        seq,
		TimeUnixMs: now.UnixMilli(),
		TtlMs:      30_000,
		Roles:      []string{"worker"},
		Version:    "test",
		Models: []*pb.ModelInfo{{
			Name:    "demo",
			Types:   []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT},
			Backend: "demo",
		}},
		Load:   &pb.Load{MaxConcurrency: 4},
		Health: 100,
	}
}

func marshal(t *testing.T, a *pb.Announce) []byte {
	t.Helper()
	b, err := proto.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestValidatorCheck(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	author := testPeerID(t)
	mod := func(f func(*pb.Announce)) func(*testing.T) []byte {
		return func(t *testing.T) []byte {
			a := validAnnounce(now, 10)
			f(a)
			return marshal(t, a)
		}
	}
	manyModels := func(a *pb.Announce) {
		for i := range 200 {
			a.Models = append(a.Models, &pb.ModelInfo{
				Name:  strings.Repeat("m", 100) + string(rune('a'+i%26)),
				Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT},
			})
		}
	}
	cases := []struct {
		name    string
		prior   uint64 // seq accepted from author before; 0 = none
		author  bool   // false: no author
		data    func(*testing.T) []byte
		want    pubsub.ValidationResult
		wantErr string
	}{
		{name: "valid", author: true, data: mod(func(*pb.Announce) {}), want: pubsub.ValidationAccept},
		{name: "newer seq", prior: 9, author: true, data: mod(func(*pb.Announce) {}), want: pubsub.ValidationAccept},
		{name: "slightly future within skew", author: true, data: mod(func(a *pb.Announce) { a.TimeUnixMs = now.Add(10 * time.Second).UnixMilli() }), want: pubsub.ValidationAccept},
		{name: "no author", data: mod(func(*pb.Announce) {}), want: pubsub.ValidationReject, wantErr: "author"},
		{name: "garbage", author: true, data: func(*testing.T) []byte { return []byte{0xff, 0xff, 0xff, 0x01, 0x02} }, want: pubsub.ValidationReject, wantErr: "malformed"},
		{name: "oversized", author: true, data: mod(manyModels), want: pubsub.ValidationReject, wantErr: "limit"},
		// This clock may be the one behind: refused, not penalised.
		{name: "future dated", author: true, data: mod(func(a *pb.Announce) { a.TimeUnixMs = now.Add(time.Hour).UnixMilli() }), want: pubsub.ValidationIgnore, wantErr: "future"},
		{name: "future dated, seq zero", author: true, data: mod(func(a *pb.Announce) { a.TimeUnixMs, a.Seq = now.Add(time.Hour).UnixMilli(), 0 }), want: pubsub.ValidationReject, wantErr: "seq"},
		{name: "seq zero", author: true, data: mod(func(a *pb.Announce) { a.Seq = 0 }), want: pubsub.ValidationReject, wantErr: "seq"},
		{name: "ttl too long", author: true, data: mod(func(a *pb.Announce) { a.TtlMs = uint32(time.Hour / time.Millisecond) }), want: pubsub.ValidationReject, wantErr: "ttl"},
		{name: "unknown query type", author: true, data: mod(func(a *pb.Announce) { a.Models[0].Types = []pb.QueryType{99} }), want: pubsub.ValidationReject, wantErr: "type"},
		{name: "health over 100", author: true, data: mod(func(a *pb.Announce) { a.Health = 101 }), want: pubsub.ValidationReject, wantErr: "health"},
		{name: "same seq", prior: 10, author: true, data: mod(func(*pb.Announce) {}), want: pubsub.ValidationIgnore, wantErr: "stale"},
		{name: "older seq", prior: 11, author: true, data: mod(func(*pb.Announce) {}), want: pubsub.ValidationIgnore, wantErr: "stale"},
		{name: "expired in transit", author: true, data: mod(func(a *pb.Announce) { a.TimeUnixMs = now.Add(-time.Hour).UnixMilli() }), want: pubsub.ValidationIgnore, wantErr: "expired"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := newAnnounceValidator(16, func() time.Time { return now })
			if tc.prior > 0 {
				if res, _, err := v.check(author, author, marshal(t, validAnnounce(now, tc.prior))); res != pubsub.ValidationAccept {
					t.Fatalf("prior announce not accepted: %v", err)
				}
			}
			from := author
			if !tc.author {
				from = ""
			}
			data := tc.data(t)
			if tc.name == "oversized" && len(data) <= protocol.MaxAnnounce {
				t.Fatalf("oversized case is only %d bytes", len(data))
			}
			res, a, err := v.check(from, from, data)
			if res != tc.want {
				t.Fatalf("result %s (err %v), want %s", resultName(res), err, resultName(tc.want))
			}
			if tc.want == pubsub.ValidationAccept {
				if err != nil || a == nil || a.GetSeq() != 10 {
					t.Fatalf("accepted with err %v, announce %v", err, a)
				}
				return
			}
			if a != nil || err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one containing %q (announce %v)", err, tc.wantErr, a)
			}
		})
	}
}

// Seqs are tracked per author: one peer's seq never makes another's stale.
func TestValidatorSeqPerAuthor(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	v := newAnnounceValidator(16, func() time.Time { return now })
	a, b := testPeerID(t), testPeerID(t)
	for _, step := range []struct {
		author peer.ID
		seq    uint64
		want   pubsub.ValidationResult
	}{
		{a, 100, pubsub.ValidationAccept},
		{b, 5, pubsub.ValidationAccept},
		{a, 6, pubsub.ValidationIgnore},
		{b, 6, pubsub.ValidationAccept},
		{a, 101, pubsub.ValidationAccept},
	} {
		p := step.author
		if res, _, err := v.check(p, p, marshal(t, validAnnounce(now, step.seq))); res != step.want {
			t.Fatalf("%s seq %d: %s (%v), want %s", p, step.seq, resultName(res), err, resultName(step.want))
		}
	}
}

// An author may announce burst times at once, then once per interval;
// beyond that its own deliveries are rejected and forwarded ones ignored.
func TestValidatorRate(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	author, fwd := testPeerID(t), testPeerID(t)
	cases := []struct {
		name string
		from peer.ID
		want pubsub.ValidationResult
	}{
		{"direct", author, pubsub.ValidationReject},
		{"forwarded", fwd, pubsub.ValidationIgnore},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := newAnnounceValidator(16, clock)
			v.every, v.burst = time.Second, 3
			seq := uint64(1)
			for i := range 3 {
				if res, _, err := v.check(author, tc.from, marshal(t, validAnnounce(now, seq))); res != pubsub.ValidationAccept {
					t.Fatalf("announce %d of the burst: %v %v", i, resultName(res), err)
				}
				seq++
			}
			res, _, err := v.check(author, tc.from, marshal(t, validAnnounce(now, seq)))
			if res != tc.want || err != errTooFrequent {
				t.Fatalf("over the burst: %s %v, want %s", resultName(res), err, resultName(tc.want))
			}
			now = now.Add(time.Second)
			if res, _, err := v.check(author, tc.from, marshal(t, validAnnounce(now, seq+1))); res != pubsub.ValidationAccept {
				t.Fatalf("after a refill: %s %v", resultName(res), err)
			}
		})
	}
}
