package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNATWorkerComesBack: a volunteer behind a port-restricted NAT,
// punched direct to the client behind another, dies and comes back twice.
//
//   - SIGKILL, then a new process on the same data dir (the same peer ID,
//     the same port): the client's punched QUIC connection to the old
//     process gets no close from it. The client answers from the new one
//     within seconds, first through a relay, and the pair punches again.
//   - SIGSTOP for longer than QUIC's idle timeout (the laptop lid closed,
//     a process swapped out), then SIGCONT: every connection of the worker
//     is gone at the other end, its relay reservations with them. A query
//     in the pause ends with an error the client reads, within its
//     timeout; after the pause the worker reserves again, answers, and the
//     pair punches again.
//
// Over QUIC, and over TCP where the client's network lets no UDP out
// (a stopped process's TCP connections live on in its kernel: the peer
// finds them dead by yamux's keep-alive). The nodes join with a token
// naming the bootstrap's QUIC and TCP addresses, so that the worker's
// connections are all QUIC and it learns no public TCP address: over TCP
// the pair punches by the address the worker guesses (withTCPGuess in
// node/punchfilter.go).
func TestNATWorkerComesBack(t *testing.T) {
	needNAT(t)
	quicAndTCPPairs(t, testNATWorkerComesBack)
}

// comebackDirectWithin bounds the wait for a new direct connection. The
// restarted worker is punched within seconds (node/repunch replaces the
// circuits that reached it before its hole-punch service started), but a
// punch that fails leaves the pair to node/repunch's later tries, each
// once the circuit the last one dialed is 3 min old (the routers'
// memory of the failed punch: node/repunch.DefaultFresh).
const comebackDirectWithin = 5 * time.Minute

func testNATWorkerComesBack(t *testing.T, wk, ck natKind) {
	n := newNATNet(t, wk, ck)
	n.tokenJoin = true
	d, join, _, client := n.startAround()
	start := time.Now()
	worker := n.start("worker", d("worker"), "--backend", "demo", "--join", join)
	wid := worker.value("peer")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	pair := fmt.Sprintf("%s / %s", wk, ck)
	first := n.firstAnswer(ctx, pair, start, worker)

	// direct waits for the pair to be direct on a new connection, and
	// returns how long after since and how it came: a hole punch the
	// client logged after since, or, once the client logged the old
	// punched connection closed, any direct one (the worker may dial the
	// client through the mapping its NAT still holds). A stale connection
	// to the dead or stopped process would otherwise show as direct.
	const punchLine, closedLine = "hole punch: direct connection", "hole-punched connection closed"
	count := func(line string) int { return strings.Count(client.output(), line) }
	direct := func(what string, since time.Time, punches, closed int) (time.Duration, string) {
		t.Helper()
		for {
			p := n.peer(wid)
			how := ""
			switch {
			case p.Path != "direct":
			case p.HolePunched && count(punchLine) > punches:
				how = "hole punch"
			case count(closedLine) > closed:
				how = "dial"
				if p.HolePunched {
					how = "hole punch"
				}
			}
			if how != "" {
				// One transport: the pair's kind at a punch's first try, or
				// TCP at its next (a failed QUIC try turns to TCP, the
				// guessed address where the worker knows none).
				if want := punchTransport(wk, ck); !slices.Equal(p.Transports, []string{want}) && !slices.Equal(p.Transports, []string{"tcp"}) {
					t.Errorf("%s: the direct connection's transports %q, want %s or tcp alone", what, p.Transports, want)
				}
				return time.Since(since), how
			}
			if time.Since(since) > comebackDirectWithin {
				t.Fatalf("%s: path %q (hole punched %v; %d punches and %d punched connections closed logged, %d and %d before) %s later, want direct on a new connection\nworker:\n%s\nclient:\n%s",
					what, p.Path, p.HolePunched, count(punchLine), count(closedLine), punches, closed, comebackDirectWithin, worker.outputTail(natTail), client.outputTail(natTail))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// answers asks until the worker answers, for within at most, and
	// returns how long after since it first did.
	answers := func(what string, since time.Time, within time.Duration) time.Duration {
		t.Helper()
		var lastErr error
		for i := 0; ; i++ {
			want := fmt.Sprintf("%s %d", what, i)
			out, err := n.query(ctx, 5*time.Second, want, "")
			if err == nil && strings.Contains(out, want) {
				return time.Since(since)
			}
			lastErr = fmt.Errorf("%v %q", err, out)
			if time.Since(since) > within {
				t.Fatalf("%s: no answer within %s: %v\nworker:\n%s\nclient:\n%s", what, within, lastErr, worker.outputTail(natTail), client.outputTail(natTail))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	firstDirect, _ := direct("after the start", start, 0, 0)

	// SIGKILL, and the same volunteer's node again.
	punches, closed := count(punchLine), count(closedLine)
	worker.stop(syscall.SIGKILL)
	killed := time.Now()
	worker = n.start("worker", d("worker"), "--backend", "demo", "--join", join)
	if got := worker.value("peer"); got != wid {
		t.Fatalf("the restarted worker is %s, want %s (the same data dir)", got, wid)
	}
	restarted := time.Now()
	// Its announcement and relay reservations are new; the client's
	// first tries may meet the dead connection.
	killAnswer := answers("after the kill", restarted, 30*time.Second)
	killDirect, killHow := direct("after the kill", restarted, punches, closed)

	// SIGSTOP past QUIC's idle timeout (libp2p's: 30 s), then SIGCONT.
	const pause = 45 * time.Second
	punches, closed = count(punchLine), count(closedLine)
	if err := worker.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = worker.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	defer resume() // so that the cleanup's stop reaches a running process
	// A query in the pause: the worker holds it and never answers; the
	// client gives up on it and says so, within the query's timeout.
	const timeout = 20 * time.Second
	qs := time.Now()
	out, err := n.query(ctx, timeout, "in the pause", "")
	took := time.Since(qs)
	if err == nil {
		t.Errorf("a query to the stopped worker answered %q, want an error", out)
	} else if !strings.Contains(err.Error(), "UNAVAILABLE") {
		t.Errorf("a query to the stopped worker failed with %v, want UNAVAILABLE (retryable)", err)
	} else if took > timeout+5*time.Second {
		t.Errorf("a query to the stopped worker took %s to fail, want its timeout %s at most", took.Round(100*time.Millisecond), timeout)
	}
	pauseErr := err
	time.Sleep(time.Until(stopped.Add(pause)))
	// Over TCP the client finds the connection dead only by yamux's
	// keep-alive (30 s idle, then a ping's 10 s): the pause lasts until
	// the client no longer holds it, a minute more at most.
	for deadline := time.Now().Add(time.Minute); n.peer(wid).Path == "direct" && time.Now().Before(deadline); {
		time.Sleep(500 * time.Millisecond)
	}
	paused := time.Since(stopped)
	resume()
	cont := time.Now()
	contAnswer := answers("after the pause", cont, 60*time.Second)
	contDirect, contHow := direct("after the pause", cont, punches, closed)

	t.Logf("%s: first answer %s, direct (hole punch) %s after the start; SIGKILL and restart %s: answered %s, direct (%s) %s after the restart; "+
		"SIGSTOP %s: a query in the pause failed after %s (%v); after SIGCONT answered %s, direct (%s) %s later",
		pair, first.Round(10*time.Millisecond), firstDirect.Round(10*time.Millisecond), restarted.Sub(killed).Round(10*time.Millisecond),
		killAnswer.Round(10*time.Millisecond), killHow, killDirect.Round(100*time.Millisecond), paused.Round(100*time.Millisecond),
		took.Round(100*time.Millisecond), pauseErr, contAnswer.Round(10*time.Millisecond), contHow, contDirect.Round(100*time.Millisecond))
}
