package router

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// mutableTable is a table whose candidates a test changes.
type mutableTable struct {
	mu sync.Mutex
	c  []Candidate
}

func (m *mutableTable) Candidates() []Candidate {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Candidate(nil), m.c...)
}

func (m *mutableTable) set(c ...Candidate) {
	m.mu.Lock()
	m.c = c
	m.mu.Unlock()
}

// A worker that cannot be dialled yet (behind NAT, before its relay
// reservation) is "unreachable", not failing: its breaker stays closed,
// the router says "unreachable" while it has not announced again, and
// uses it as soon as it announces a new address that works.
func TestUnreachableIsNotFailing(t *testing.T) {
	w := demoWorker(t, "natted", 0)
	h := testHost(t)
	closed := ma.StringCast("/ip4/127.0.0.1/tcp/1") // nothing listens on port 1
	withAddrs := func(addrs ...ma.Multiaddr) func(*pb.Announce) {
		return func(a *pb.Announce) {
			a.Addrs = nil
			for _, m := range addrs {
				a.Addrs = append(a.Addrs, m.Bytes())
			}
		}
	}
	c := cand(string(w.ID()), 0, 4, 100, 0, demoModel, withAddrs(closed))
	c.Received = time.Now()
	table := &mutableTable{}
	table.set(c)
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithMaxAttempts(2))
	req := func() error {
		_, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi"}, func(*pb.Event) error { return nil })
		return err
	}
	err := req()
	if err == nil || !strings.Contains(err.Error(), "could not be reached") {
		t.Fatalf("first query: %v, want the worker could not be reached", err)
	}
	for range 5 {
		err = req()
	}
	pe := protocol.AsError(err)
	if pe.Code != protocol.CodeUnavailable || !strings.Contains(pe.Message, "unreachable") {
		t.Fatalf("queries before it announces again: %v, want UNAVAILABLE … unreachable", err)
	}
	if v := r.Peers(); len(v) != 1 || v[0].Breaker != "closed" || !v[0].Unreachable {
		t.Fatalf("peer view %+v: want breaker closed and unreachable", v)
	}
	// It announces again, now with an address that works.
	h.Peerstore().ClearAddrs(w.ID())
	c2 := cand(string(w.ID()), 0, 4, 100, 0, demoModel, withAddrs(w.Addrs()...))
	c2.Received = time.Now()
	table.set(c2)
	if err := req(); err != nil {
		t.Fatalf("after a new announcement: %v", err)
	}
	if v := r.Peers(); v[0].Path != "direct" || v[0].Unreachable {
		t.Fatalf("peer view %+v: want a direct path, reachable", v[0])
	}
}

// A worker known only with addresses that fail is looked up again after
// the failed dial, and reached at the addresses found.
func TestReresolvesAfterAFailedDial(t *testing.T) {
	w := demoWorker(t, "moved", 0)
	h := testHost(t)
	c := cand(string(w.ID()), 0, 4, 100, 0, demoModel)
	h.Peerstore().AddAddr(w.ID(), ma.StringCast("/ip4/127.0.0.1/tcp/1"), peerstore.TempAddrTTL)
	r := New(h, testProto, staticTable{c}, WithPeerFinder(finderFunc(func() peer.AddrInfo {
		return peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}
	})), WithMaxAttempts(1))
	if _, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hi"}, func(*pb.Event) error { return nil }); err != nil {
		t.Fatalf("query: %v", err)
	}
}

type finderFunc func() peer.AddrInfo

func (f finderFunc) FindPeer(context.Context, peer.ID) (peer.AddrInfo, error) { return f(), nil }
