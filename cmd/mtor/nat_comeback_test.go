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
	for _, p := range [][2]natKind{{natRestricted, natRestricted}, {natRestricted, natUDPBlocked}} {
		t.Run(string(p[0])+"/"+string(p[1]), func(t *testing.T) { testNATWorkerComesBack(t, p[0], p[1]) })
	}
}

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

	// punched waits for the pair to be direct after a new hole punch,
	// one the client logged after since (a stale connection to the dead
	// or stopped process could still show "direct"), and returns how long
	// after since.
	const punchLine = "hole punch: direct connection"
	punched := func(what string, since time.Time, before int) time.Duration {
		t.Helper()
		for {
			p := n.peer(wid)
			if p.Path == "direct" && p.HolePunched && strings.Count(client.output(), punchLine) > before {
				if want := punchTransport(wk, ck); !slices.Equal(p.Transports, []string{want}) {
					t.Errorf("%s: the punched connection's transports %q, want %s alone", what, p.Transports, want)
				}
				return time.Since(since)
			}
			if time.Since(since) > natRepunchWithin {
				t.Fatalf("%s: path %q (hole punched %v, %d punches logged, %d before) %s later, want direct after a new hole punch\nworker:\n%s\nclient:\n%s",
					what, p.Path, p.HolePunched, strings.Count(client.output(), punchLine), before, natRepunchWithin, worker.outputTail(natTail), client.outputTail(natTail))
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
	direct := punched("after the start", start, 0)

	// SIGKILL, and the same volunteer's node again.
	before := strings.Count(client.output(), punchLine)
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
	killDirect := punched("after the kill", restarted, before)

	// SIGSTOP past QUIC's idle timeout (libp2p's: 30 s), then SIGCONT.
	const pause = 45 * time.Second
	before = strings.Count(client.output(), punchLine)
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
	} else if took > timeout+5*time.Second {
		t.Errorf("a query to the stopped worker took %s to fail, want its timeout %s at most", took.Round(100*time.Millisecond), timeout)
	}
	pauseErr := err
	time.Sleep(time.Until(stopped.Add(pause)))
	resume()
	cont := time.Now()
	contAnswer := answers("after the pause", cont, 60*time.Second)
	contDirect := punched("after the pause", cont, before)

	t.Logf("%s: first answer %s, direct (hole punch) %s after the start; SIGKILL and restart %s: answered %s, direct %s after the restart; "+
		"SIGSTOP %s: a query in the pause failed after %s (%v); after SIGCONT answered %s, direct %s later",
		pair, first.Round(10*time.Millisecond), direct.Round(10*time.Millisecond), restarted.Sub(killed).Round(10*time.Millisecond),
		killAnswer.Round(10*time.Millisecond), killDirect.Round(100*time.Millisecond), pause,
		took.Round(100*time.Millisecond), pauseErr, contAnswer.Round(10*time.Millisecond), contDirect.Round(100*time.Millisecond))
}
