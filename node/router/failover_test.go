package router

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/protocol/ping"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/node/internal/netproxy"
	"github.com/mtor-swarm/mtor/node/liveness"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

const testProto = "/mtor/test/query"

// demoWorker is a real worker with the demo backend on its own host.
func demoWorker(t *testing.T, label string, delay time.Duration) host.Host {
	t.Helper()
	return demoWorkerOn(t, "/ip4/127.0.0.1/tcp/0", label, delay)
}

// demoWorkerOn is demoWorker listening on listen.
func demoWorkerOn(t *testing.T, listen, label string, delay time.Duration) host.Host {
	t.Helper()
	return backendWorkerOn(t, listen, demo.New(label, demo.WithDelay(delay)))
}

// backendWorkerOn is a real worker serving b on its own host, listening
// on listen.
func backendWorkerOn(t *testing.T, listen string, b backend.Backend, opts ...worker.Option) host.Host {
	t.Helper()
	return serveBackend(testHostOn(t, listen), b, opts...)
}

// serveBackend makes h a real worker serving b.
func serveBackend(h host.Host, b backend.Backend, opts ...worker.Option) host.Host {
	w := worker.New([]backend.Backend{b}, opts...)
	w.Refresh(context.Background())
	h.SetStreamHandler(testProto, w.HandleStream)
	return h
}

func connect(t *testing.T, h host.Host, others ...host.Host) {
	t.Helper()
	for _, o := range others {
		if err := h.Connect(t.Context(), peer.AddrInfo{ID: o.ID(), Addrs: o.Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
}

func demoModel(a *pb.Announce) { a.Models[0].Name = "demo" }
func canCont(a *pb.Announce) {
	a.Models[0].Features = []string{protocol.FeatureContinue}
}

// TestContinuesTheAnswerOfAWorkerThatDies: a worker dies mid-answer (its
// host closes, as a killed process's would) and a caller that cannot take
// output back (a stream shown to a person) still gets one whole answer:
// the next worker continues it, with nothing lost or repeated at the seam.
func TestContinuesTheAnswerOfAWorkerThatDies(t *testing.T) {
	dying := demoWorker(t, "first", 30*time.Millisecond)
	live := demoWorker(t, "second", 0)
	h := testHost(t)
	connect(t, h, dying, live)
	table := staticTable{
		cand(string(dying.ID()), 0, 4, 100, 0, demoModel, canCont),
		cand(string(live.ID()), 0, 4, 100, 500*time.Millisecond, demoModel, canCont),
	}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond))
	var text strings.Builder
	chunks := 0
	accepted := 0
	res, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "tell me the whole story"},
		func(ev *pb.Event) error {
			switch k := ev.GetKind().(type) {
			case nil:
				t.Error("the handler was told to discard output: a restart, not a continuation")
			case *pb.Event_Accepted:
				accepted++
			case *pb.Event_Chunk:
				text.WriteString(k.Chunk.GetText())
				// Past the demo's "[demo answer from first] " header.
				if chunks++; chunks == 5 {
					go dying.Close()
				}
			}
			return nil
		})
	if err != nil {
		t.Fatalf("query failed though a second worker could continue it: %v", err)
	}
	want := "[demo answer from first] You said: tell me the whole story"
	if text.String() != want {
		t.Fatalf("answer %q, want %q", text.String(), want)
	}
	if w := res.ContinuedBy(); len(w) != 2 || w[0] != dying.ID().String() || w[1] != live.ID().String() {
		t.Fatalf("writers %v, want the dying worker then the live one", w)
	}
	if res.Peer != live.ID() || res.Continued != 1 || accepted != 1 {
		t.Fatalf("answered by %s, continued %d times, %d Accepted passed on; want the second worker, 1, 1", res.Peer, res.Continued, accepted)
	}
	if got := res.Done.GetUsage().GetCompletionTokens(); got != 11 {
		t.Fatalf("completion tokens %d, want 11 (both workers' parts)", got)
	}
}

// fakeWorker is a host whose query streams serve answers: it reads each
// stream's request, resets a stream without one, and hands the rest to
// answer, the behaviour of the worker it stands in for.
func fakeWorker(t *testing.T, answer func(s network.Stream, req *pb.QueryRequest)) host.Host {
	return fakeWorkerOn(t, "/ip4/127.0.0.1/tcp/0", answer)
}

// fakeWorkerOn is fakeWorker listening on listen.
func fakeWorkerOn(t *testing.T, listen string, answer func(s network.Stream, req *pb.QueryRequest)) host.Host {
	h := testHostOn(t, listen)
	h.SetStreamHandler(testProto, func(s network.Stream) {
		var req pb.QueryRequest
		if err := protocol.NewFrameReader(s, protocol.MaxRequestFrame).Read(&req); err != nil {
			s.Reset()
			return
		}
		answer(s, &req)
	})
	return h
}

// acceptThenDie stands in for a worker process that dies right after it
// accepted a query.
func acceptThenDie(t *testing.T) host.Host {
	return fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		time.Sleep(50 * time.Millisecond)
		s.Reset()
	})
}

// TestExhaustedAttemptsSayWhatHappened: when every worker tried dies, the
// error is UNAVAILABLE and says so, not a backend error.
func TestExhaustedAttemptsSayWhatHappened(t *testing.T) {
	h := testHost(t)
	var table staticTable
	for range 3 {
		d := acceptThenDie(t)
		connect(t, h, d)
		table = append(table, cand(string(d.ID()), 0, 4, 100, 0, demoModel))
	}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond))
	_, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"},
		func(*pb.Event) error { return nil })
	pe := protocol.AsError(err)
	if pe == nil || pe.Code != protocol.CodeUnavailable || !pe.Retryable || pe.Message != "3 workers died while answering" {
		t.Fatalf("error %v, want a retryable UNAVAILABLE: 3 workers died while answering", err)
	}
}

// acceptThenFreeze stands in for a worker process frozen (SIGSTOP) right
// after it accepted a query: its stream stays open and silent, and so do
// its pings.
func acceptThenFreeze(t *testing.T) host.Host {
	frozen := make(chan struct{})
	t.Cleanup(func() { close(frozen) })
	h := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		<-frozen // the router gives up on it meanwhile
		s.Reset()
	})
	h.SetStreamHandler(ping.ID, func(s network.Stream) {
		<-frozen
		s.Reset()
	})
	return h
}

// TestExhaustedAttemptsTellDeathFromSilence: workers that froze are not
// reported as dead.
func TestExhaustedAttemptsTellDeathFromSilence(t *testing.T) {
	h := testHost(t)
	var table staticTable
	for _, start := range []func(*testing.T) host.Host{acceptThenFreeze, acceptThenFreeze, acceptThenDie} {
		d := start(t)
		connect(t, h, d)
		table = append(table, cand(string(d.ID()), 0, 4, 100, 0, demoModel))
	}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithIdleTimeout(200*time.Millisecond))
	_, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"},
		func(*pb.Event) error { return nil })
	pe := protocol.AsError(err)
	want := "1 worker died while answering, 2 workers went silent while answering"
	if pe == nil || pe.Code != protocol.CodeUnavailable || !pe.Retryable || pe.Message != want {
		t.Fatalf("error %v, want a retryable UNAVAILABLE: %s", err, want)
	}
}

// slowStartWorker is a real worker whose backend starts after wait.
func slowStartWorker(t *testing.T, label string, wait time.Duration) host.Host {
	t.Helper()
	return backendWorkerOn(t, "/ip4/127.0.0.1/tcp/0", backendtest.SlowStart{Backend: demo.New(label), Wait: wait}, worker.WithHeartbeat(100*time.Millisecond))
}

// hello is a chat query "hello" to the demo model.
func hello() *pb.QueryRequest {
	return &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}
}

// askText runs req through r and returns the result and the text the
// client holds at the end (a restart takes back what came before it).
func askText(ctx context.Context, r *Router, req *pb.QueryRequest) (*Result, string, error) {
	var b strings.Builder
	res, err := r.Query(ctx, req, func(ev *pb.Event) error {
		if ev == nil {
			b.Reset()
		}
		b.WriteString(ev.GetChunk().GetText())
		return nil
	})
	return res, b.String(), err
}

// TestStallBoundOnlyWithAnAlternative: a worker that heartbeats without
// output past the stall bound loses the query to another worker when
// there is one; when it is the only worker, the query waits for it and
// gets its answer, instead of an error that waiting would have avoided.
func TestStallBoundOnlyWithAnAlternative(t *testing.T) {
	const stall = 300 * time.Millisecond
	for _, tc := range []struct {
		name       string
		other      bool
		wantWriter string
	}{
		{"alone: waits for the slow start", false, "slow"},
		{"with another worker: moves on", true, "quick"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slow := slowStartWorker(t, "slow", 5*stall)
			h := testHost(t)
			connect(t, h, slow)
			// The slow worker ranks first (lower expected TTFT).
			table := staticTable{cand(string(slow.ID()), 0, 4, 100, 0, demoModel)}
			if tc.other {
				quick := demoWorker(t, "quick", 0)
				connect(t, h, quick)
				table = append(table, cand(string(quick.ID()), 0, 4, 100, 500*time.Millisecond, demoModel))
			}
			r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithStallTimeout(stall))
			res, text, err := askText(t.Context(), r, hello())
			if err != nil {
				t.Fatalf("query failed: %v", err)
			}
			if !strings.Contains(text, "[demo answer from "+tc.wantWriter+"]") {
				t.Fatalf("answer %q (from %s in %d attempts), want %s's", text, res.Peer, res.Attempts, tc.wantWriter)
			}
		})
	}
}

// TestAloneIsAskedWhenTheStallFires: whether another worker could take
// the query is asked when the stall bound passes, not when the attempt
// began. A worker that joins while the only one stalls takes the query;
// when the other worker leaves the table while the first stalls, the
// query waits for the first, which answers, instead of failing it and
// starting over.
func TestAloneIsAskedWhenTheStallFires(t *testing.T) {
	const stall = 300 * time.Millisecond
	for _, tr := range transports {
		for _, tc := range []struct {
			name         string
			otherAtFirst bool
			wantWriter   string
			wantAttempts int
		}{
			{"a worker joins while the only one stalls", false, "quick", 2},
			{"the other worker leaves while the first stalls", true, "slow", 1},
		} {
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				slow := backendWorkerOn(t, tr.listen, backendtest.SlowStart{Backend: demo.New("slow"), Wait: 6 * stall}, worker.WithHeartbeat(100*time.Millisecond))
				quick := demoWorkerOn(t, tr.listen, "quick", 0)
				h := testHostOn(t, tr.listen)
				connect(t, h, slow, quick)
				slowC := cand(string(slow.ID()), 0, 4, 100, 0, demoModel)
				quickC := cand(string(quick.ID()), 0, 4, 100, 500*time.Millisecond, demoModel)
				table := &mutableTable{}
				if tc.otherAtFirst {
					table.set(slowC, quickC)
				} else {
					table.set(slowC)
				}
				// Half a stall period in, the table changes.
				time.AfterFunc(stall/2, func() {
					if tc.otherAtFirst {
						table.set(slowC)
					} else {
						table.set(slowC, quickC)
					}
				})
				r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithStallTimeout(stall))
				res, text, err := askText(t.Context(), r, hello())
				if err != nil {
					t.Fatalf("query failed: %v", err)
				}
				if !strings.Contains(text, "[demo answer from "+tc.wantWriter+"]") || res.Attempts != tc.wantAttempts {
					t.Fatalf("answer %q from %s in %d attempts, want %s's in %d", text, res.Peer, res.Attempts, tc.wantWriter, tc.wantAttempts)
				}
			})
		}
	}
}

// TestWaitingOnKeepsTheSilenceBound: waiting on a lone stalled worker
// does not stretch the bound on its silence: a worker that accepts and
// then falls silent fails as silent, not at the query's deadline.
func TestWaitingOnKeepsTheSilenceBound(t *testing.T) {
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	frozen := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		<-hold
		s.Reset()
	})
	h := testHost(t)
	connect(t, h, frozen)
	r := New(h, testProto, staticTable{cand(string(frozen.ID()), 0, 4, 100, 0, demoModel)},
		WithRetryBackoff(time.Millisecond), WithStallTimeout(300*time.Millisecond), WithIdleTimeout(time.Second), WithMaxAttempts(1))
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello",
		DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
	_, err := r.Query(t.Context(), req, func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code == protocol.CodeTimeout {
		t.Fatalf("error %v; want the frozen worker failed for its silence, not the query's deadline", err)
	}
}

// TestAStallDoesNotMoveToABannedWorker: a worker banned from the model
// (its breaker for it open) is tried when nothing else is left, but it
// is no reason to give up a live worker that is slow.
func TestAStallDoesNotMoveToABannedWorker(t *testing.T) {
	const stall = 300 * time.Millisecond
	var handed atomic.Int64
	banned := emptyAnswers(t, protocol.FinishStop, &handed)
	slow := slowStartWorker(t, "slow", 5*stall)
	h := testHost(t)
	connect(t, h, slow, banned)
	table := staticTable{cand(string(slow.ID()), 0, 4, 100, 0, demoModel), cand(string(banned.ID()), 0, 4, 100, time.Second, demoModel)}
	r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithStallTimeout(stall))
	r.mu.Lock()
	mt := r.modelTrackerLocked(r.state(banned.ID()), "demo")
	for mt.Available() {
		mt.Record(health.Failure)
	}
	r.mu.Unlock()
	res, text, err := askText(t.Context(), r, hello())
	if err != nil {
		t.Fatal(err)
	}
	if res.Peer != slow.ID() || res.Attempts != 1 || handed.Load() != 0 || !strings.Contains(text, "[demo answer from slow]") {
		t.Fatalf("%q from %s in %d attempts, the banned worker handed %d; want the slow worker's answer at once", text, res.Peer, res.Attempts, handed.Load())
	}
}

// TestDeadlineIsTimeoutAndBlamesNobody: a query whose own deadline runs
// out while a worker is slow to accept ends TIMEOUT, and the worker keeps
// its health: the deadline was the query's, not the peer's failure.
func TestDeadlineIsTimeoutAndBlamesNobody(t *testing.T) {
	slow := testHost(t)
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	slow.SetStreamHandler(testProto, func(s network.Stream) { <-hold; s.Reset() })
	h := testHost(t)
	connect(t, h, slow)
	r := New(h, testProto, staticTable{cand(string(slow.ID()), 0, 4, 100, 0, demoModel)})
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello",
		DeadlineUnixMs: time.Now().Add(300 * time.Millisecond).UnixMilli()}
	_, err := r.Query(t.Context(), req, func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeTimeout {
		t.Fatalf("error %v, want TIMEOUT", err)
	}
	for _, v := range r.Peers() {
		if v.LocalHealth < 100 || v.Breaker != "closed" {
			t.Fatalf("peer %s at health %v, breaker %s after the query's own deadline: want untouched", v.Peer, v.LocalHealth, v.Breaker)
		}
	}
}

// TestLocalStreamLimitIsBusy: when this node's resource manager refuses
// the stream, the query is BUSY (backpressure) and the peer is not blamed.
func TestLocalStreamLimitIsBusy(t *testing.T) {
	live := demoWorker(t, "live", 0)
	limits := rcmgr.PartialLimitConfig{
		Protocol: map[libp2pproto.ID]rcmgr.ResourceLimits{testProto: {Streams: rcmgr.BlockAllLimit, StreamsOutbound: rcmgr.BlockAllLimit}},
	}.Build(rcmgr.DefaultLimits.AutoScale())
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(limits))
	if err != nil {
		t.Fatal(err)
	}
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.ResourceManager(rm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	connect(t, h, live)
	r := New(h, testProto, staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel)})
	_, err = r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"},
		func(*pb.Event) error { return nil })
	if pe := protocol.AsError(err); pe == nil || pe.Code != protocol.CodeBusy {
		t.Fatalf("error %v, want BUSY", err)
	}
	for _, v := range r.Peers() {
		if v.LocalHealth < 100 {
			t.Fatalf("peer %s lost health (%v) for a limit of this node", v.Peer, v.LocalHealth)
		}
	}
}

// TestRestartedPeerStartsAfresh: a peer whose breaker opened is routable
// again as soon as it announces a new incarnation (it restarted), each
// time; a hold from its old queue ends, its row of holds does not.
func TestRestartedPeerStartsAfresh(t *testing.T) {
	inc := func(n uint64) func(*pb.Announce) { return func(a *pb.Announce) { a.Incarnation = n } }
	var table atomic.Pointer[staticTable]
	announce := func(n uint64) { table.Store(&staticTable{cand("w", 0, 4, 100, 0, inc(n))}) }
	announce(1)
	r := New(testHost(t), "/test", tableFunc(func() []Candidate { return *table.Load() }))
	ranked := func() bool {
		rk, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
		return len(rk) == 1
	}
	if !ranked() {
		t.Fatal("peer not ranked")
	}
	for i := range 3 {
		r.mu.Lock()
		st := r.state("w")
		for range 5 {
			r.recordLocked(st, (*table.Load())[0], "m", peerFailure{kind: failDied, err: protocol.Errorf(protocol.CodeUnavailable, "died")}, time.Time{}, time.Now(), time.Now())
		}
		st.heldUntil, st.holds = time.Now().Add(time.Hour), 3 // its old queue held a query
		r.mu.Unlock()
		if ranked() {
			t.Fatal("a peer with an open breaker is still ranked")
		}
		announce(uint64(i + 2))
		if !ranked() {
			t.Fatalf("restart %d: the restarted peer is not ranked again", i+1)
		}
		r.mu.Lock()
		held, holds := !st.heldUntil.IsZero(), st.holds
		r.mu.Unlock()
		if held || holds != 3 {
			t.Fatalf("restart %d: held %v, %d holds in a row (want none, 3 kept)", i+1, held, holds)
		}
	}
}

// TestClaimedFreshStartIsTested: a peer with an open breaker announces
// a new incarnation (a restart) or new addresses. If the process at the
// other end of a connection from before its claim (one it held well
// before, or the one it failed on) answers a ping, no fresh start is
// proven and the breaker stands; a restart claim answered on a
// connection from well before is a lie, and later claims clear nothing,
// while after the others a real restart is still forgiven. If no such
// connection is left (a TCP connection closes with its process), or the
// one left is silent (a killed process's QUIC connection, which lingers:
// here a UDP proxy that stops forwarding), the breaker is cleared.
func TestClaimedFreshStartIsTested(t *testing.T) {
	restart := func(n uint64) func(*pb.Announce) { return func(a *pb.Announce) { a.Incarnation = n } }
	move := func(n uint64) func(*pb.Announce) {
		return func(a *pb.Announce) {
			a.Addrs = [][]byte{ma.StringCast(fmt.Sprintf("/ip4/127.0.0.1/tcp/%d", 40000+n)).Bytes()}
		}
	}
	const (
		answers = iota // the old process answers on the old connection
		gone           // it closed: a new process with its key connects
		silent         // it stops answering (QUIC, through a proxy)
	)
	const margin = 300 * time.Millisecond // the router's restartMargin, for the test
	for _, tr := range transports {
		for _, tc := range []struct {
			name  string
			claim func(n uint64) func(*pb.Announce)
			old   int
			aged  bool // the connection is older than the margin at the claim
			back  bool // the claim clears the breaker
			lie   bool // then a real restart is not forgiven either
		}{
			{"restart, an old connection answers", restart, answers, true, false, true},
			{"new addresses, an old connection answers", move, answers, true, false, false},
			{"restart, the connection it failed on answers", restart, answers, false, false, false},
			{"restart, its old process gone", restart, gone, true, true, false},
			{"restart, its old connection silent", restart, silent, true, true, false},
			{"new addresses, its old connection silent", move, silent, false, true, false},
		} {
			if tc.old == silent && tr.name != "quic" {
				continue
			}
			t.Run(tr.name+"/"+tc.name, func(t *testing.T) {
				key, _, err := crypto.GenerateEd25519Key(nil)
				if err != nil {
					t.Fatal(err)
				}
				h, w := testHostOn(t, tr.listen), testHostOn(t, tr.listen, libp2p.Identity(key))
				var proxy *netproxy.UDP
				if tc.old == silent {
					proxy = netproxy.NewUDP(t, w.Addrs()[0], 0)
					if err := h.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: []ma.Multiaddr{proxy.Addr}}); err != nil {
						t.Fatal(err)
					}
				} else {
					connect(t, h, w)
				}
				if tc.aged {
					time.Sleep(2 * margin)
				}
				announce := func(claim func(*pb.Announce)) []Candidate {
					c := cand(string(w.ID()), 0, 4, 100, 0, func(a *pb.Announce) {
						a.Incarnation = 1
						a.Addrs = [][]byte{w.Addrs()[0].Bytes()}
					}, claim)
					c.Received = time.Now()
					return []Candidate{c}
				}
				var table atomic.Pointer[[]Candidate]
				table.Store(ptr(announce(func(*pb.Announce) {})))
				r, ranked := probingRouter(t, h, &table, margin)
				if !ranked() {
					t.Fatal("peer not ranked")
				}
				r.mu.Lock()
				st := r.state(w.ID())
				for range 5 { // it fails on the connection it has
					r.recordLocked(st, (*table.Load())[0], "m", peerFailure{kind: failDied, err: protocol.Errorf(protocol.CodeUnavailable, "died"),
						conn: h.Network().ConnsToPeer(w.ID())[0]}, time.Time{}, time.Now(), time.Now())
				}
				r.mu.Unlock()
				if ranked() {
					t.Fatal("a peer with an open breaker is still ranked")
				}
				newProcess := func() {
					_ = w.Close()
					for len(h.Network().ConnsToPeer(w.ID())) > 0 {
						time.Sleep(10 * time.Millisecond)
					}
					w = testHostOn(t, tr.listen, libp2p.Identity(key))
					connect(t, h, w)
				}
				switch tc.old {
				case gone:
					newProcess()
				case silent:
					proxy.Freeze()
				}
				// Whether the claim clears the breaker: the verdict comes
				// within the probe's timeout (500 ms).
				claim := func(c func(*pb.Announce)) bool {
					table.Store(ptr(announce(c)))
					for start := time.Now(); time.Since(start) < 1500*time.Millisecond; time.Sleep(10 * time.Millisecond) {
						if ranked() {
							return true
						}
					}
					return false
				}
				if back := claim(tc.claim(2)); back != tc.back {
					t.Fatalf("routable again after the claim: %v, want %v", back, tc.back)
				}
				if tc.back {
					return
				}
				// Then its process really restarts (its connections go
				// with it): forgiven, unless it was caught lying.
				newProcess()
				if back := claim(restart(3)); back == tc.lie {
					t.Fatalf("routable again after a real restart: %v, want %v", back, !tc.lie)
				}
			})
		}
	}
}

// TestOldProcessFailsAfterItsRestart: a query the old process of a
// worker held fails after the worker's restart was ranked (a killed
// process's QUIC connection lingers silent until a probe closes it,
// seconds after its successor announced itself). Those failures are the
// old process's: they are cleared once nothing answers on the connection
// they came on, and the new process stays routable. A liar claiming the
// restart while it answers there keeps them, and so does a new process
// that fails itself.
func TestOldProcessFailsAfterItsRestart(t *testing.T) {
	const margin = 300 * time.Millisecond
	for _, tc := range []struct {
		name     string
		silent   bool   // the old process is gone: its connection silent
		failedOn uint64 // the incarnation the failing attempt was ranked on
		// then, while the silent connection is probed, it fails again,
		// on a connection that answers
		again    bool
		routable bool
	}{
		{"the old process's connection silent", true, 1, false, true},
		{"the old process answers there", false, 1, false, false},
		{"the new process fails", true, 2, false, false},
		{"fails again on a live connection during the probe", true, 1, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, _, err := crypto.GenerateEd25519Key(nil)
			if err != nil {
				t.Fatal(err)
			}
			h, w := testHostOn(t, "/ip4/127.0.0.1/udp/0/quic-v1"), testHostOn(t, "/ip4/127.0.0.1/udp/0/quic-v1", libp2p.Identity(key))
			proxy := netproxy.NewUDP(t, w.Addrs()[0], 0)
			if err := h.Connect(t.Context(), peer.AddrInfo{ID: w.ID(), Addrs: []ma.Multiaddr{proxy.Addr}}); err != nil {
				t.Fatal(err)
			}
			old := h.Network().ConnsToPeer(w.ID())[0]
			time.Sleep(2 * margin)
			announce := func(inc uint64) Candidate {
				c := cand(string(w.ID()), 0, 4, 100, 0, func(a *pb.Announce) {
					a.Incarnation = inc
					a.Addrs = [][]byte{w.Addrs()[0].Bytes()}
				})
				c.Received = time.Now()
				return c
			}
			var table atomic.Pointer[[]Candidate]
			table.Store(ptr([]Candidate{announce(1)}))
			r, ranked := probingRouter(t, h, &table, margin)
			if !ranked() {
				t.Fatal("peer not ranked")
			}
			if tc.silent {
				proxy.Freeze() // the old process is killed
			}
			// The restart is ranked while its breaker is clean: nothing
			// to forgive yet.
			table.Store(ptr([]Candidate{announce(2)}))
			if !ranked() {
				t.Fatal("the restarted peer is not ranked")
			}
			r.mu.Lock()
			st := r.state(w.ID())
			failed := announce(tc.failedOn)
			fail := func(conn network.Conn) {
				for range 5 {
					r.recordLocked(st, failed, "m", peerFailure{kind: failStalled, err: protocol.Errorf(protocol.CodeUnavailable, "stalled"), conn: conn},
						time.Time{}, time.Now(), time.Now())
				}
			}
			fail(old)
			r.mu.Unlock()
			if tc.again {
				// Another process with its key (it answers probes).
				w2 := testHostOn(t, "/ip4/127.0.0.1/udp/0/quic-v1", libp2p.Identity(key))
				connect(t, w2, h)
				var conn network.Conn
				for _, c := range h.Network().ConnsToPeer(w.ID()) {
					if c != old {
						conn = c
					}
				}
				if conn == nil {
					t.Fatal("no second connection")
				}
				r.mu.Lock()
				if !st.forgiving {
					t.Fatal("no verdict pending on the silent connection")
				}
				fail(conn)
				r.mu.Unlock()
			}
			routable := false
			for start := time.Now(); time.Since(start) < 1500*time.Millisecond && !routable; time.Sleep(10 * time.Millisecond) {
				routable = ranked()
			}
			if routable != tc.routable {
				t.Fatalf("routable after its old process's failures: %v, want %v", routable, tc.routable)
			}
		})
	}
}

// probingRouter is a router on h over the candidates in table, with a
// connection checker whose probes time out in 500 ms, the given restart
// margin, and bans that outlast a test (no half-open trial). ranked
// reports whether its one candidate is ranked for model "m".
func probingRouter(t *testing.T, h host.Host, table *atomic.Pointer[[]Candidate], margin time.Duration) (r *Router, ranked func() bool) {
	t.Helper()
	live := liveness.New(h, liveness.WithTimeout(500*time.Millisecond))
	t.Cleanup(live.Close)
	r = New(h, testProto, tableFunc(func() []Candidate { return *table.Load() }), WithConnChecker(live),
		WithHealthOptions(health.WithCooldown(time.Hour, time.Hour)))
	r.margin = margin
	return r, func() bool {
		rk, _ := r.rank("m", pb.QueryType_QUERY_TYPE_CHAT)
		return len(rk) == 1
	}
}

func ptr[T any](v T) *T { return &v }

type tableFunc func() []Candidate

func (f tableFunc) Candidates() []Candidate { return f() }

// TestContinuationCountsWhatWasSaid: a continued request asks only for the
// tokens the answer has left, and still names the text said so far.
func TestContinuationCountsWhatWasSaid(t *testing.T) {
	for _, c := range []struct {
		name          string
		params        *pb.Params
		chunks        uint32
		wantMaxTokens uint32
	}{
		{"some said", &pb.Params{MaxTokens: 10}, 3, 7},
		{"all said", &pb.Params{MaxTokens: 10}, 10, 1},
		{"more chunks than asked", &pb.Params{MaxTokens: 10}, 12, 1},
		{"no limit", &pb.Params{}, 5, 0},
		{"no params", nil, 5, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			req := &pb.QueryRequest{Model: "m", Params: c.params}
			q := &query{req: req, chunks: c.chunks, resumeAt: "so far"}
			got := q.request()
			if got.GetContinuation() != "so far" || got.GetParams().GetMaxTokens() != c.wantMaxTokens {
				t.Fatalf("continuation %q, max_tokens %d; want %q, %d", got.GetContinuation(), got.GetParams().GetMaxTokens(), "so far", c.wantMaxTokens)
			}
			if req.GetParams().GetMaxTokens() != c.params.GetMaxTokens() {
				t.Fatal("the original request was changed")
			}
		})
	}
}

// seekLog records what the router tells its Seeker.
type seekLog struct {
	mu    sync.Mutex
	calls [][]peer.ID // unusable peers of each call, sorted
}

func (s *seekLog) SeekWorkers(model string, unusable []peer.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if model != "demo" {
		panic("seek for model " + model)
	}
	u := slices.Clone(unusable)
	slices.Sort(u)
	s.calls = append(s.calls, u)
}

// TestSeekerToldWhenNoWorkerServes: when none of the workers the table
// holds can serve a model (all draining, failing, full, or all failed the
// query), the router asks its Seeker for more, naming the peers it found
// failing; while one serves, it asks nothing.
func TestSeekerToldWhenNoWorkerServes(t *testing.T) {
	h := testHost(t)
	draining := func(a *pb.Announce) { a.Draining = true }
	dead := make([]host.Host, 2)
	for i := range dead {
		dead[i] = acceptThenDie(t)
		connect(t, h, dead[i])
	}
	live := demoWorker(t, "live", 0)
	connect(t, h, live)
	deadIDs := []peer.ID{dead[0].ID(), dead[1].ID()}
	slices.Sort(deadIDs)
	tests := []struct {
		name   string
		table  staticTable
		broken peer.ID // its breaker is open
		want   [][]peer.ID
	}{
		{"all draining", staticTable{cand("leaving", 0, 4, 100, 0, demoModel, draining)}, "", [][]peer.ID{{}}},
		{"all failing", staticTable{cand("bad", 0, 4, 100, 0, demoModel)}, "bad", [][]peer.ID{{"bad"}}},
		{"all tried failed", staticTable{cand(string(dead[0].ID()), 0, 4, 100, 0, demoModel), cand(string(dead[1].ID()), 0, 4, 100, 0, demoModel)}, "", [][]peer.ID{deadIDs}},
		{"all full, then it answers", staticTable{cand(string(live.ID()), 4, 4, 100, 0, demoModel)}, "", [][]peer.ID{{}}},
		{"one serves", staticTable{cand(string(live.ID()), 0, 4, 100, 0, demoModel), cand("leaving", 0, 4, 100, 0, demoModel, draining)}, "", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := &seekLog{}
			r := New(h, testProto, tc.table, WithSeeker(s), WithRetryBackoff(time.Millisecond), WithHealthOptions(health.WithThreshold(1)))
			if tc.broken != "" {
				r.mu.Lock()
				r.state(tc.broken).tracker.Record(health.Failure)
				r.mu.Unlock()
			}
			_, _ = r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"},
				func(*pb.Event) error { return nil })
			s.mu.Lock()
			defer s.mu.Unlock()
			if len(s.calls) != len(tc.want) {
				t.Fatalf("seeker told %v, want %v", s.calls, tc.want)
			}
			for i := range tc.want {
				if !slices.Equal(s.calls[i], tc.want[i]) {
					t.Fatalf("seeker told %v, want %v", s.calls, tc.want)
				}
			}
		})
	}
}

// fakeProgress stands in for a worker that pretends to make progress
// while it answers nothing: it counts its queue position down from 2^31,
// or sends empty chunks, every 50 ms.
func fakeProgress(t *testing.T, emptyChunks bool) host.Host {
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	return fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		defer s.Reset()
		pos := uint32(1 << 31)
		if emptyChunks {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 250}}})
		}
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			ev := &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: pos, HeartbeatMs: 250}}}
			if emptyChunks {
				ev = &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{}}}
			}
			if err := protocol.WriteFrame(s, ev); err != nil {
				return
			}
			pos--
			select {
			case <-tick.C:
			case <-stop:
				return
			}
		}
	})
}

// liarFirst is a router whose table ranks liar first and an honest demo
// worker second; it returns the router and the honest worker.
func liarFirst(t *testing.T, liar host.Host, opts ...Option) (*Router, host.Host) {
	honest := demoWorker(t, "honest", 0)
	h := testHost(t)
	connect(t, h, liar, honest)
	table := staticTable{
		cand(string(liar.ID()), 0, 4, 100, 0, demoModel),
		cand(string(honest.ID()), 0, 4, 100, time.Second, demoModel),
	}
	return New(h, testProto, table, append([]Option{WithRetryBackoff(time.Millisecond)}, opts...)...), honest
}

// aheadClock stands in for a worker whose clock runs minutes ahead of
// the router's (a real worker checks deadline_unix_ms against its own
// clock): it takes every query for expired and answers TIMEOUT at once.
// With said, it first streams some of the answer: a clock a little ahead
// stops a query while it runs.
func aheadClock(t *testing.T, handed *atomic.Int64, said bool) host.Host {
	return fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		handed.Add(1)
		defer s.Close()
		if said {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "so far"}}})
		}
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Error{Error: protocol.Errorf(protocol.CodeTimeout, "deadline passed before the query started").Proto()}})
	})
}

// timesOutAtOnce stands in for a node's own worker whose backend times
// out at once (a gateway's 504): it answers TIMEOUT, after some of the
// answer with said.
type timesOutAtOnce struct {
	handed *atomic.Int64
	said   bool
}

func (l timesOutAtOnce) Serve(_ context.Context, _ *pb.QueryRequest, emit func(*pb.Event) error) (*pb.Done, error) {
	l.handed.Add(1)
	if l.said {
		_ = emit(&pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		_ = emit(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "so far"}}})
	}
	return nil, protocol.Errorf(protocol.CodeTimeout, "deadline passed before the query started")
}

// TestEarlyTimeoutMovesOn: a worker's TIMEOUT while the query has 2 s
// or more left by the router's clock is that worker's failure (its clock
// ahead, or a lie): the query moves to another worker, or ends
// UNAVAILABLE naming it when there is none. Near the deadline, a TIMEOUT
// is the query's own and ends it as before; so is one after output with
// less than the announcements' clock skew (30 s) left, where the client
// keeps what it read. The same holds for the node's own worker (own),
// asked without a stream, whose early TIMEOUT is its backend's.
func TestEarlyTimeoutMovesOn(t *testing.T) {
	for _, tc := range []struct {
		name     string
		other    bool
		said     bool // the worker streams some of the answer first
		deadline time.Duration
		code     pb.ErrorCode // 0: answered by the other worker
		message  string
	}{
		{name: "another worker answers", other: true, deadline: 10 * time.Second},
		{name: "alone", deadline: 10 * time.Second, code: protocol.CodeUnavailable,
			message: "1 worker timed out long before the deadline (last: deadline passed before the query started)"},
		{name: "near the deadline: the query's own", other: true, deadline: 1500 * time.Millisecond, code: protocol.CodeTimeout,
			message: "deadline passed before the query started"},
		{name: "after output, 10 s left: the query's own", other: true, said: true, deadline: 10 * time.Second, code: protocol.CodeTimeout,
			message: "deadline passed before the query started"},
		{name: "after output, a minute left: another worker answers", other: true, said: true, deadline: time.Minute},
	} {
		for _, own := range []bool{false, true} {
			name := tc.name
			if own {
				name = "own worker, " + name
			}
			t.Run(name, func(t *testing.T) {
				var handed atomic.Int64
				var r *Router
				var honest host.Host
				switch {
				case own:
					h := testHost(t)
					table := staticTable{cand(string(h.ID()), 0, 4, 100, 0, demoModel)}
					if tc.other {
						honest = demoWorker(t, "honest", 0)
						connect(t, h, honest)
						table = append(table, cand(string(honest.ID()), 0, 4, 100, time.Second, demoModel))
					}
					r = New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithLocal(timesOutAtOnce{&handed, tc.said}))
				case tc.other:
					r, honest = liarFirst(t, aheadClock(t, &handed, tc.said))
				default:
					h, w := testHost(t), aheadClock(t, &handed, tc.said)
					connect(t, h, w)
					r = New(h, testProto, staticTable{cand(string(w.ID()), 0, 4, 100, 0, demoModel)}, WithRetryBackoff(time.Millisecond))
				}
				// May start again elsewhere after output, as the bridge's
				// APIs allow.
				ctx, cancel := context.WithTimeout(WithRestart(t.Context()), tc.deadline)
				defer cancel()
				res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
				if handed.Load() != 1 {
					t.Fatalf("the worker that timed out was handed %d queries, want 1", handed.Load())
				}
				if tc.code != 0 {
					if pe := protocol.AsError(err); pe == nil || pe.Code != tc.code || pe.Message != tc.message {
						t.Fatalf("error %v, want %s: %s", err, protocol.CodeName(tc.code), tc.message)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if res.Peer != honest.ID() || res.Attempts != 2 {
					t.Fatalf("answered by %s in %d attempts, want the other worker in 2", res.Peer, res.Attempts)
				}
			})
		}
	}
}

// TestSummaryCleansTheWorkersWords: the words of a worker that timed out
// early reach the client in the query's summary with no control
// characters (a terminal's escape sequences) and at most maxWhy bytes.
func TestSummaryCleansTheWorkersWords(t *testing.T) {
	q := &query{earlyWhy: "\x1b[2J\x1b[31mowned\r\n" + strings.Repeat("ü", 300)}
	q.kinds[failEarlyTimeout] = 2
	got := q.summary()
	const want = "2 workers timed out long before the deadline (last: [2J [31mowned ü"
	if !strings.HasPrefix(got, want) || strings.ContainsFunc(got, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		t.Fatalf("summary %q, want it to start %q, with no control character", got, want)
	}
	why := strings.TrimSuffix(strings.TrimPrefix(got, "2 workers timed out long before the deadline (last: "), ")")
	if len(why) > maxWhy+len("…") || !strings.HasSuffix(why, "…") {
		t.Fatalf("the worker's words, %d bytes, not cut to %d: %q", len(why), maxWhy, why)
	}
}

// TestTimeoutEarlyWithinTheWorkersCut: a worker lets a query run 10 min
// from its request at most (protocol.MaxQueryDeadline), whatever its
// deadline: its TIMEOUT at that cut is not early, though the query's own
// deadline is further.
func TestTimeoutEarlyWithinTheWorkersCut(t *testing.T) {
	timeout := protocol.Errorf(protocol.CodeTimeout, "deadline exceeded while running the backend")
	for _, tc := range []struct {
		name     string
		deadline time.Duration // of the query, from now
		sentAgo  time.Duration
		answered bool
		err      *protocol.Error
		early    bool
	}{
		{"at once, a minute left", time.Minute, 0, false, timeout, true},
		{"at the worker's cut, the query's deadline an hour away", time.Hour, protocol.MaxQueryDeadline - time.Second, false, timeout, false},
		{"before the worker's cut", time.Hour, protocol.MaxQueryDeadline - time.Minute, false, timeout, true},
		{"after output, 20 s left", 20 * time.Second, 0, true, timeout, false},
		{"after output, a minute left", time.Minute, 0, true, timeout, true},
		{"not a TIMEOUT", time.Minute, 0, false, protocol.Errorf(protocol.CodeBackendError, "x"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), tc.deadline)
			defer cancel()
			if _, early := timeoutEarly(ctx, tc.err, time.Now().Add(-tc.sentAgo), tc.answered); early != tc.early {
				t.Fatalf("early %v, want %v", early, tc.early)
			}
		})
	}
}

// TestFakeProgressIsAStall: a queue position beyond what the worker
// announced it queues, counting down, or empty chunks, are no progress:
// the stall bound moves the query to an honest worker instead of leaving
// it with the liar until its deadline.
func TestFakeProgressIsAStall(t *testing.T) {
	for _, tc := range []struct {
		name  string
		empty bool
	}{{"queue position counted down from 2^31", false}, {"empty chunks", true}} {
		t.Run(tc.name, func(t *testing.T) {
			r, honest := liarFirst(t, fakeProgress(t, tc.empty), WithStallTimeout(300*time.Millisecond))
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
			if err != nil {
				t.Fatalf("query held by a worker faking progress: %v", err)
			}
			if res.Peer != honest.ID() || res.Attempts != 2 {
				t.Fatalf("answered by %s in %d attempts, want the honest worker in 2", res.Peer, res.Attempts)
			}
		})
	}
}

// answersWith stands in for a worker that answers every query with ev
// (one that does not fit the query) and a Done; a nil ev sends a Done
// alone, with no Accepted.
func answersWith(t *testing.T, ev *pb.Event) host.Host {
	return fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		defer s.Close()
		if ev != nil {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
			_ = protocol.WriteFrame(s, ev)
		}
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{FinishReason: protocol.FinishStop, Usage: &pb.Usage{CompletionTokens: 7}}}})
	})
}

// TestEventsThatDoNotFitTheQueryAreViolations: a tool call to a query
// that offers no tools, media or a vector in answer to a chat, never
// reach the client: the worker broke the protocol, and an honest worker
// answers instead.
func TestEventsThatDoNotFitTheQueryAreViolations(t *testing.T) {
	for _, tc := range []struct {
		name string
		ev   *pb.Event
	}{
		{"tool call never offered", &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Index: 63, Id: "c", Name: "rm_rf", Arguments: `{"path":"/"}`}}}},
		{"media to a chat", &pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "image/png", Data: []byte{1}}}}},
		{"a vector to a chat", &pb.Event{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Vector: []float32{1}}}}},
		{"a Done before Accepted", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, honest := liarFirst(t, answersWith(t, tc.ev))
			res, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(ev *pb.Event) error {
				if _, ok := ev.GetKind().(*pb.Event_Chunk); !ok && ev != nil {
					if _, acc := ev.GetKind().(*pb.Event_Accepted); !acc {
						t.Errorf("the client was handed %T", ev.GetKind())
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Peer != honest.ID() {
				t.Fatalf("answered by %s, want the honest worker", res.Peer)
			}
		})
	}
}

// emptyAnswers stands in for a worker that answers every query at once
// with nothing: Accepted, then a Done that stops with finish, and no
// output. It counts the queries it is handed.
func emptyAnswers(t *testing.T, finish string, handed *atomic.Int64) host.Host {
	return fakeWorker(t, func(s network.Stream, req *pb.QueryRequest) {
		defer s.Close()
		handed.Add(1)
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{Model: req.GetModel(), FinishReason: finish,
			Usage: &pb.Usage{PromptTokens: 2, CompletionTokens: 3}, Timing: &pb.Timing{TtftMs: 1, TotalMs: 1}}}})
	})
}

// TestEmptyAnswers: a worker that answers nothing at once (a liar, or a
// broken model server) would be the fastest worker of the swarm. Its
// empty answer fails it for the model while another worker can answer,
// and that worker answers; the liar is soon out of rotation. Alone, or
// stopped at its length limit (a reasoning model's hidden thinking),
// an empty answer is the answer.
func TestEmptyAnswers(t *testing.T) {
	t.Run("another worker answers", func(t *testing.T) {
		var handed atomic.Int64
		r, honest := liarFirst(t, emptyAnswers(t, protocol.FinishStop, &handed))
		for i := range 10 {
			res, text, err := askText(t.Context(), r, hello())
			if err != nil {
				t.Fatalf("query %d: %v", i, err)
			}
			if res.Peer != honest.ID() || text == "" {
				t.Fatalf("query %d answered %q by %s, want the honest worker's text", i, text, res.Peer)
			}
		}
		// Each empty answer fails the liar for the model: 3 ban it.
		if n := handed.Load(); n > 3 {
			t.Fatalf("the worker answering nothing was handed %d of 10 queries, want at most 3", n)
		}
		// The ban shows in the peer view, per model.
		for _, v := range r.Peers() {
			if v.Peer != honest.ID().String() && (len(v.Models) != 1 || v.Models[0].Breaker != "open") {
				t.Fatalf("the liar's models in the peer view: %+v; want demo's breaker open", v.Models)
			}
		}
	})
	t.Run("every worker answers nothing: the second's is the answer, and nobody is blamed", func(t *testing.T) {
		var first, second atomic.Int64
		a, b := emptyAnswers(t, protocol.FinishStop, &first), emptyAnswers(t, protocol.FinishStop, &second)
		h := testHost(t)
		connect(t, h, a, b)
		r := New(h, testProto, staticTable{cand(string(a.ID()), 0, 4, 100, 0, demoModel), cand(string(b.ID()), 0, 4, 100, time.Second, demoModel)}, WithRetryBackoff(time.Millisecond))
		// A prompt whose honest answer is empty, asked again and again,
		// must not ban the workers that answer it (3 failures would).
		for i := range 4 {
			res, err := r.Query(t.Context(), hello(), func(*pb.Event) error { return nil })
			if err != nil || res.Attempts != 2 {
				t.Fatalf("query %d: %+v, %v; want the second worker's empty answer at the second attempt", i, res, err)
			}
		}
		if first.Load()+second.Load() != 8 {
			t.Fatalf("the workers were handed %d and %d queries, want 8 in all", first.Load(), second.Load())
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, w := range []host.Host{a, b} {
			if mt := r.state(w.ID()).model("demo"); mt != nil && !mt.Available() {
				t.Fatalf("worker %s banned from the model for answering an empty prompt's answer", w.ID())
			}
		}
	})
	t.Run("a stop sequence does not shelter a liar", func(t *testing.T) {
		var handed atomic.Int64
		r, honest := liarFirst(t, emptyAnswers(t, protocol.FinishStop, &handed))
		req := hello()
		req.Params = &pb.Params{Stop: []string{"zzz"}}
		res, text, err := askText(t.Context(), r, req)
		if err != nil || res.Peer != honest.ID() || text == "" {
			t.Fatalf("%+v, %v, text %q; want the honest worker's answer", res, err, text)
		}
	})
	t.Run("a later worker's output cut off is not passed off as whole", func(t *testing.T) {
		var handed atomic.Int64
		empty := emptyAnswers(t, protocol.FinishStop, &handed)
		cut := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "partial"}}})
			time.Sleep(50 * time.Millisecond)
			s.Reset()
		})
		h := testHost(t)
		connect(t, h, empty, cut)
		table := staticTable{cand(string(empty.ID()), 0, 4, 100, 0, demoModel), cand(string(cut.ID()), 0, 4, 100, time.Second, demoModel)}
		for _, restart := range []bool{false, true} {
			r := New(h, testProto, table, WithRetryBackoff(time.Millisecond))
			ctx := t.Context()
			if restart {
				ctx = WithRestart(ctx)
			}
			if res, text, err := askText(ctx, r, hello()); err == nil {
				t.Fatalf("restartable %v: %q passed off as a whole answer (%+v)", restart, text, res.Done)
			}
		}
	})
	for _, tc := range []struct{ name, finish string }{
		{"alone", protocol.FinishStop},
		{"stopped at its length", protocol.FinishLength},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var handed atomic.Int64
			var r *Router
			if tc.finish == protocol.FinishLength {
				r, _ = liarFirst(t, emptyAnswers(t, tc.finish, &handed))
			} else {
				h := testHost(t)
				w := emptyAnswers(t, tc.finish, &handed)
				connect(t, h, w)
				r = New(h, testProto, staticTable{cand(string(w.ID()), 0, 4, 100, 0, demoModel)}, WithRetryBackoff(time.Millisecond))
			}
			res, err := r.Query(t.Context(), hello(), func(*pb.Event) error { return nil })
			if err != nil {
				t.Fatal(err)
			}
			if res.Attempts != 1 || handed.Load() != 1 || res.Done.GetFinishReason() != tc.finish {
				t.Fatalf("%d attempts, the empty worker handed %d, finish %q: want its empty answer at the first attempt", res.Attempts, handed.Load(), res.Done.GetFinishReason())
			}
		})
	}
}

// TestStallEdges: a stall moves on only to a worker that could take the
// query now, not to one its announcement says is full; and an empty
// answer set aside is the answer when the query's deadline passes
// during a later attempt, rather than a TIMEOUT with an answer in hand.
func TestStallEdges(t *testing.T) {
	const stall = 300 * time.Millisecond
	t.Run("the other worker is full", func(t *testing.T) {
		slow := slowStartWorker(t, "slow", 5*stall)
		other := demoWorker(t, "other", 0)
		h := testHost(t)
		connect(t, h, slow, other)
		table := staticTable{cand(string(slow.ID()), 0, 4, 100, 0, demoModel), cand(string(other.ID()), 4, 4, 100, 0, demoModel)}
		r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithStallTimeout(stall))
		res, text, err := askText(t.Context(), r, hello())
		if err != nil {
			t.Fatal(err)
		}
		if res.Attempts != 1 || !strings.Contains(text, "[demo answer from slow]") {
			t.Fatalf("%q in %d attempts; want the slow worker's answer, waited for", text, res.Attempts)
		}
	})
	t.Run("the deadline passes after an empty answer", func(t *testing.T) {
		var handed atomic.Int64
		empty := emptyAnswers(t, protocol.FinishStop, &handed)
		beating := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
			for protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 100}}}) == nil {
				time.Sleep(100 * time.Millisecond)
			}
		})
		h := testHost(t)
		connect(t, h, empty, beating)
		table := staticTable{cand(string(empty.ID()), 0, 4, 100, 0, demoModel), cand(string(beating.ID()), 0, 4, 100, time.Second, demoModel)}
		r := New(h, testProto, table, WithRetryBackoff(time.Millisecond), WithStallTimeout(time.Minute))
		req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello",
			DeadlineUnixMs: time.Now().Add(time.Second).UnixMilli()}
		res, err := r.Query(t.Context(), req, func(*pb.Event) error { return nil })
		if err != nil || res.Peer != empty.ID() {
			t.Fatalf("%+v, %v; want the empty answer in hand", res, err)
		}
	})
}

// TestWaitsForItsOnlyWorkerToRestart: the only worker of a model dies
// mid-answer and its process starts again (same key, new incarnation),
// announcing itself a while later: 1.2 s here, about what a process
// restarted at once needs to start, join and announce. The query waits for
// it and the new process continues the answer. With no restart, or with
// too little of the query's deadline left to wait in, the query ends
// UNAVAILABLE, naming the death, before its deadline.
func TestWaitsForItsOnlyWorkerToRestart(t *testing.T) {
	for _, tc := range []struct {
		name     string
		restart  bool
		deadline time.Duration // of the query; 0: none
		answered bool
	}{
		{"restarted", true, 0, true},
		{"gone for good", false, 0, false},
		{"restarted, too late for the deadline", true, 2 * time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, _, err := crypto.GenerateEd25519Key(nil)
			if err != nil {
				t.Fatal(err)
			}
			workerOn := func() host.Host {
				return serveBackend(testHostOn(t, "/ip4/127.0.0.1/tcp/0", libp2p.Identity(key)), demo.New("w", demo.WithDelay(30*time.Millisecond)))
			}
			first := workerOn()
			h := testHost(t)
			connect(t, h, first)
			announce := func(inc uint64) *[]Candidate {
				return ptr([]Candidate{cand(string(first.ID()), 0, 4, 100, 0, demoModel, canCont,
					func(a *pb.Announce) { a.Incarnation = inc })})
			}
			var table atomic.Pointer[[]Candidate]
			table.Store(announce(1))
			r := New(h, testProto, tableFunc(func() []Candidate { return *table.Load() }))
			ctx := t.Context()
			if tc.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.deadline)
				defer cancel()
			}
			var text strings.Builder
			chunks := 0
			var died time.Time
			// The restart's goroutine ends before the test does.
			var restarting sync.WaitGroup
			defer restarting.Wait()
			start := time.Now()
			_, err = r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "tell me the whole story"},
				func(ev *pb.Event) error {
					if c := ev.GetChunk(); c != nil {
						text.WriteString(c.GetText())
						if chunks++; chunks == 5 {
							died = time.Now()
							restarting.Go(func() {
								_ = first.Close()
								if !tc.restart {
									return
								}
								time.Sleep(1200 * time.Millisecond)
								again := workerOn()
								connect(t, h, again)
								table.Store(announce(2))
							})
						}
					}
					return nil
				})
			took := time.Since(start)
			if !tc.answered {
				var pe *protocol.Error
				if !errors.As(err, &pe) || pe.Code != protocol.CodeUnavailable || !strings.Contains(pe.Message, "died") {
					t.Fatalf("after %s: %v, want UNAVAILABLE naming the death", took, err)
				}
				if tc.deadline > 0 && took >= tc.deadline {
					t.Fatalf("the error came after the deadline (%s)", took)
				}
				t.Logf("%s after the death: %v", time.Since(died).Round(time.Millisecond), err)
				return
			}
			if err != nil {
				t.Fatalf("%s after the death: %v", time.Since(died).Round(time.Millisecond), err)
			}
			if want := "[demo answer from w] You said: tell me the whole story"; text.String() != want {
				t.Fatalf("answer %q, want %q", text.String(), want)
			}
		})
	}
}

// TestFreshWaitOnlyForAQueryThatCanMove: once every candidate has failed
// a query, it waits for a restarted worker only when another worker could
// still take it; and up to 3 s only after a worker died, three back-offs
// after other failures. A worker to be asked again (a silent one that
// answers pings, or one on another path) is asked with no such wait.
func TestFreshWaitOnlyForAQueryThatCanMove(t *testing.T) {
	for _, tc := range []struct {
		name                     string
		started, restartable     bool
		continuable              bool
		textLen                  int
		died                     bool
		retry                    bool
		wantNoWait, wantFullWait bool
	}{
		{name: "nothing said yet, a worker died", died: true, wantFullWait: true},
		{name: "nothing said yet, a worker died, it is asked again", died: true, retry: true, wantNoWait: true},
		{name: "nothing said yet, a backend failed, it is asked again", retry: true, wantNoWait: true},
		{name: "said, continuable, a worker died", started: true, continuable: true, textLen: 10, died: true, wantFullWait: true},
		{name: "said, cannot move on", started: true, textLen: 10, died: true, wantNoWait: true},
		{name: "said too much to continue", started: true, continuable: true, textLen: protocol.MaxContinuation + 1, died: true, wantNoWait: true},
		{name: "nothing said yet, a backend failed", died: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(testHost(t), testProto, staticTable{cand("w", 0, 4, 100, 0)})
			q := &query{req: &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m"}, tried: map[tryKey]bool{{"w", 0}: true},
				failures: 1, out: tc.started, restartable: tc.restartable, continuable: tc.continuable}
			q.text.WriteString(strings.Repeat("x", tc.textLen))
			if tc.died {
				q.kinds[failDied]++
			} else {
				q.kinds[failBackend]++
			}
			ranked, ok := r.nextCandidates(t.Context(), q, nil, false, nil, tc.retry)
			if !ok || len(ranked) != 0 {
				t.Fatalf("ranked %d, ok %v: want none, true", len(ranked), ok)
			}
			switch {
			case tc.wantNoWait && q.waits != 0:
				t.Fatalf("waited %d times (%s) for a worker that could not take the query", q.waits, q.waited)
			case tc.wantFullWait && q.waited != freshWait:
				t.Fatalf("waited %s in %d back-offs, want %s", q.waited, q.waits, freshWait)
			case !tc.wantNoWait && !tc.wantFullWait && q.waits != maxCandidateWaits:
				t.Fatalf("waited %d times, want %d", q.waits, maxCandidateWaits)
			}
		})
	}
}

// silentOnce stands in for a worker on a link that holds a stream's
// frames for seconds (TCP backing off a segment lost again and again):
// it accepts the first `silent` queries and then sends nothing on them
// (no heartbeat either), and answers the rest. Its host answers pings,
// counted in pinged, unless frozen, which stands in for a frozen process
// (SIGSTOP): its pings go unanswered too. It counts the queries it is
// handed. With failing, its backend fails the rest instead.
func silentOnce(t *testing.T, silent int64, frozen, failing bool, handed, pinged *atomic.Int64) host.Host {
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	h := fakeWorker(t, func(s network.Stream, req *pb.QueryRequest) {
		n := handed.Add(1)
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		if n <= silent {
			<-stop
			s.Reset()
			return
		}
		defer s.Close()
		if failing {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Error{Error: protocol.Errorf(protocol.CodeBackendError, "model crashed").Proto()}})
			return
		}
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "whole"}}})
		_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{Model: req.GetModel(), FinishReason: protocol.FinishStop,
			Usage: &pb.Usage{PromptTokens: 1, CompletionTokens: 1}}}})
	})
	h.SetStreamHandler(ping.ID, func(s network.Stream) {
		pinged.Add(1)
		if frozen {
			<-stop
			s.Reset()
			return
		}
		echoPings(s)
	})
	return h
}

// TestSilentButAliveWorkerAskedAgain: a worker that falls silent on a
// query past the silence bound, and that no other worker could replace,
// is asked again once if it answers a ping: its process and connection
// live, and a lossy link held the stream. A frozen one (no ping answered)
// is not, one silent twice is not asked a third time, one that broke the
// protocol meanwhile is not (a ban), nor is one when less than a second
// is left before the query's deadline (the caller gets UNAVAILABLE, not
// TIMEOUT); and one with another worker to replace it is not pinged:
// the other answers.
func TestSilentButAliveWorkerAskedAgain(t *testing.T) {
	for _, tc := range []struct {
		name     string
		silent   int64
		frozen   bool
		failing  bool // its backend fails the query asked again
		other    bool
		violate  bool          // a violation is recorded while it is silent
		deadline time.Duration // of the query; 20 s if zero
		handed   int64         // queries the silent worker was handed
		pinged   bool          // whether it was pinged
		attempts int           // 0: the query fails
		code     pb.ErrorCode  // the error's when it fails; UNAVAILABLE if 0
		err      string        // its message; the silence if empty
	}{
		{name: "alive, alone: asked again", silent: 1, handed: 2, pinged: true, attempts: 2},
		{name: "frozen, alone: not asked again", silent: 1, frozen: true, handed: 1, pinged: true},
		{name: "silent twice: not asked a third time", silent: 2, handed: 2, pinged: true},
		{name: "banned meanwhile: not asked again", silent: 1, violate: true, handed: 1},
		{name: "under a second left: not asked again", silent: 1, deadline: 1200 * time.Millisecond, handed: 1},
		{name: "another worker takes it", silent: 1, other: true, handed: 1, attempts: 2},
		// The silence is taken back: the worker's own report is the
		// query's error, as when a worker's backend fails at once.
		{name: "asked again, its backend fails: its error, not the silence", silent: 1, failing: true, handed: 2, pinged: true,
			code: protocol.CodeBackendError, err: "model crashed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var handed, pinged atomic.Int64
			w := silentOnce(t, tc.silent, tc.frozen, tc.failing, &handed, &pinged)
			opts := []Option{WithIdleTimeout(300 * time.Millisecond), WithRetryBackoff(time.Millisecond)}
			var r *Router
			var honest host.Host
			if tc.other {
				r, honest = liarFirst(t, w, opts...)
			} else {
				h := testHost(t)
				connect(t, h, w)
				r = New(h, testProto, staticTable{cand(string(w.ID()), 0, 4, 100, 0, demoModel)}, opts...)
			}
			if tc.violate {
				go func() {
					for handed.Load() == 0 {
						time.Sleep(time.Millisecond)
					}
					r.mu.Lock()
					r.state(w.ID()).tracker.Record(health.Violation) // on another stream
					r.mu.Unlock()
				}()
			}
			ctx, cancel := context.WithTimeout(t.Context(), cmp.Or(tc.deadline, 20*time.Second))
			defer cancel()
			res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
			if got := handed.Load(); got != tc.handed {
				t.Errorf("the silent worker was handed %d queries, want %d", got, tc.handed)
			}
			if got := pinged.Load() > 0; got != tc.pinged {
				t.Errorf("the silent worker pinged: %v, want %v", got, tc.pinged)
			}
			if tc.attempts == 0 {
				pe := protocol.AsError(err)
				// One worker, however often it was asked.
				code, want := cmp.Or(tc.code, protocol.CodeUnavailable), cmp.Or(tc.err, "1 worker went silent while answering")
				if pe == nil || pe.Code != code || pe.Message != want {
					t.Fatalf("error %v, want %s: %s", err, protocol.CodeName(code), want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := w.ID()
			if tc.other {
				want = honest.ID()
			}
			if res.Peer != want || res.Attempts != tc.attempts {
				t.Fatalf("answered by %s in %d attempts, want %s in %d", res.Peer, res.Attempts, want, tc.attempts)
			}
		})
	}
}

// TestSilentButAliveWorkerAskedAgainPastItsBreaker: a link dark for a
// moment silences every stream on it at once. Three queries fall silent
// on the only worker together, their failures open its breaker (3 in a
// row), and each is still asked again, since the worker answers a ping:
// all three are answered, and the answers close the breaker.
func TestSilentButAliveWorkerAskedAgainPastItsBreaker(t *testing.T) {
	var handed, pinged atomic.Int64
	w := silentOnce(t, 3, false, false, &handed, &pinged)
	h := testHost(t)
	connect(t, h, w)
	r := New(h, testProto, staticTable{cand(string(w.ID()), 0, 4, 100, 0, demoModel)},
		WithIdleTimeout(300*time.Millisecond), WithRetryBackoff(time.Millisecond))
	askTogether(t, r, 3, 2, "")
	if got := handed.Load(); got != 6 {
		t.Errorf("the worker was handed %d queries, want 6 (3, silent, and 3 again)", got)
	}
	breaker := "not listed"
	for _, v := range r.Peers() {
		if v.Peer == w.ID().String() {
			breaker = v.Breaker
		}
	}
	if breaker != "closed" {
		t.Errorf("breaker %s after the answers, want closed", breaker)
	}
}

// TestAskedAgainThroughARestart: three queries fall silent on the only
// worker together (its breaker opens), it answers a ping, and each is
// asked again past its breaker; then its process dies (its QUIC
// connection goes silent, nothing resets it) and a new process with its
// key connects. The connection checker closes the old connection as
// dead, which breaks the three retries: each is asked again, past the
// breaker still, and the new process answers all three. Without that
// third try the open breaker left no worker, and the queries failed.
func TestAskedAgainThroughARestart(t *testing.T) {
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	const quic = "/ip4/127.0.0.1/udp/0/quic-v1"
	h := testHostOn(t, quic)
	var handed, pinged atomic.Int64
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	var proxy *netproxy.UDP
	var restart sync.Once
	restarted := make(chan host.Host, 1)
	old := testHostOn(t, quic, libp2p.Identity(key))
	old.SetStreamHandler(testProto, func(s network.Stream) {
		var req pb.QueryRequest
		if err := protocol.NewFrameReader(s, protocol.MaxRequestFrame).Read(&req); err != nil {
			s.Reset()
			return
		}
		if n := handed.Add(1); n <= 3 {
			_ = protocol.WriteFrame(s, &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{HeartbeatMs: 1000}}})
		} else if n == 6 {
			// All three asked again: the process dies now, and its
			// successor comes.
			restart.Do(func() {
				proxy.Freeze()
				go func() {
					w := serveBackend(testHostOn(t, quic, libp2p.Identity(key)), demo.New("new", demo.WithDelay(0)))
					if err := w.Connect(context.Background(), peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}); err != nil {
						t.Error(err)
					}
					restarted <- w
				}()
			})
		}
		<-stop
		s.Reset()
	})
	old.SetStreamHandler(ping.ID, func(s network.Stream) {
		pinged.Add(1)
		echoPings(s)
	})
	proxy = netproxy.NewUDP(t, old.Addrs()[0], 0)
	if err := h.Connect(t.Context(), peer.AddrInfo{ID: old.ID(), Addrs: []ma.Multiaddr{proxy.Addr}}); err != nil {
		t.Fatal(err)
	}
	live := liveness.New(h, liveness.WithTimeout(100*time.Millisecond))
	t.Cleanup(live.Close)
	r := New(h, testProto, staticTable{cand(string(old.ID()), 0, 4, 100, 0, demoModel)}, WithConnChecker(live),
		WithIdleTimeout(time.Second), WithRetryBackoff(time.Millisecond))
	askTogether(t, r, 3, 3, " (silent, the dead connection, the new process)")
	if got := handed.Load(); got != 6 || pinged.Load() == 0 {
		t.Errorf("the old process was handed %d queries and pinged %d times, want the 3 and each again, after a ping", got, pinged.Load())
	}
	select {
	case <-restarted:
	default:
		t.Fatal("no new process")
	}
	if live.Closed() == 0 {
		t.Error("the old process's connection was not closed as dead")
	}
}

// TestAskedAgainButPacedOut: a query falls silent on the only worker,
// which answers a ping; meanwhile another query took the one stream open
// this node's pacing allows that worker, with none let wait. The retry is
// refused here, so the worker was never asked again: its silence stays
// in the query's error, beside the refusal.
func TestAskedAgainButPacedOut(t *testing.T) {
	var handed, pings atomic.Int64
	stop := make(chan struct{})
	other, otherArrived := make(chan struct{}), make(chan struct{})
	w := fakeWorker(t, func(s network.Stream, _ *pb.QueryRequest) {
		if handed.Add(1) == 2 {
			close(otherArrived)
		}
		<-stop // silent: not even Accepted
		s.Reset()
	})
	w.SetStreamHandler(ping.ID, func(s network.Stream) {
		if pings.Add(1) == 1 {
			// The first query's ping: the other query comes now, and
			// takes the free turn before the ping is answered.
			close(other)
			<-otherArrived
		}
		echoPings(s)
	})
	h := testHost(t)
	t.Cleanup(func() { close(stop) }) // before the hosts close
	connect(t, h, w)
	r := New(h, testProto, staticTable{cand(string(w.ID()), 0, 4, 100, 0, demoModel)}, WithOpenPacing(1, 0),
		WithAcceptTimeout(300*time.Millisecond), WithIdleTimeout(300*time.Millisecond), WithRetryBackoff(time.Millisecond))
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	ask := func() error {
		_, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		<-other
		_ = ask()
	})
	err := ask()
	pe := protocol.AsError(err)
	if want := "1 worker did not answer, 1 busy or shutting down"; pe == nil || pe.Code != protocol.CodeUnavailable || pe.Message != want {
		t.Fatalf("error %v, want UNAVAILABLE: %s", err, want)
	}
	if pings.Load() == 0 {
		t.Fatal("the silent worker was not pinged")
	}
}

// askTogether asks r n chat queries of model "demo" at once, within 20
// s, and wants each answered in the given attempts (why says which).
func askTogether(t *testing.T, r *Router, n, attempts int, why string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range errs {
		wg.Go(func() {
			res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
			if err == nil && res.Attempts != attempts {
				err = fmt.Errorf("answered in %d attempts, want %d%s", res.Attempts, attempts, why)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("query %d: %v", i, err)
		}
	}
}

// echoPings answers libp2p's ping on s: 32 bytes echoed, as often as
// asked.
func echoPings(s network.Stream) {
	defer s.Close()
	buf := make([]byte, ping.PingSize)
	for {
		if _, err := io.ReadFull(s, buf); err != nil {
			return
		}
		if _, err := s.Write(buf); err != nil {
			return
		}
	}
}

// TestWithAgain: the worker to be tried again replaces the same process's
// entry in a fresh ranking (which lacks its alive mark), is added when the
// ranking lacks it, and leaves a newer process of the peer as ranked.
func TestWithAgain(t *testing.T) {
	entry := func(id string, incarnation uint64, alive bool) scored {
		c := scored{Candidate: cand(id, 0, 4, 100, 0), alive: alive}
		c.Announce.Incarnation = incarnation
		return c
	}
	again := entry("w", 1, true)
	for _, tc := range []struct {
		name   string
		ranked []scored
		want   []scored
	}{
		{"not ranked: added last", []scored{entry("o", 1, false)}, []scored{entry("o", 1, false), again}},
		{"ranked without its mark: replaced in place", []scored{entry("w", 1, false), entry("o", 1, false)}, []scored{again, entry("o", 1, false)}},
		{"a newer process ranked: kept", []scored{entry("o", 1, false), entry("w", 2, false)}, []scored{entry("o", 1, false), entry("w", 2, false)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := withAgain(tc.ranked, []scored{again})
			if len(got) != len(tc.want) {
				t.Fatalf("%d candidates, want %d", len(got), len(tc.want))
			}
			for i := range got {
				if got[i].Peer != tc.want[i].Peer || got[i].alive != tc.want[i].alive || got[i].Announce.GetIncarnation() != tc.want[i].Announce.GetIncarnation() {
					t.Fatalf("candidate %d: %s incarnation %d alive %v, want %s incarnation %d alive %v", i,
						got[i].Peer, got[i].Announce.GetIncarnation(), got[i].alive, tc.want[i].Peer, tc.want[i].Announce.GetIncarnation(), tc.want[i].alive)
				}
			}
		})
	}
}
