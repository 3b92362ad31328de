package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// darken drops every packet between the pair's namespaces, both ways,
// until the returned func is called: a link that goes dark for a moment
// (Wi-Fi roaming, a saturated uplink) with no reset and no FIN, the
// connections left to their retransmissions. Packets are dropped as they
// arrive, not as they leave: a drop on output fails the sender's own
// sendmsg (EPERM), which a QUIC stack takes for a broken socket, where a
// dark link tells it nothing.
func darken(t *testing.T, n netnsPair) (light func()) {
	t.Helper()
	for _, side := range []struct{ ns, from string }{{n.a, n.ipB}, {n.b, n.ipA}} {
		if out, err := nftLoad(side.ns, nftInputTable("mtordark", -10, "ip saddr "+side.from+" drop")); err != nil {
			t.Fatalf("nft: %v: %s", err, out)
		}
	}
	var once sync.Once
	light = func() {
		once.Do(func() {
			for _, ns := range []string{n.a, n.b} {
				if out, err := exec.Command("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "mtordark").CombinedOutput(); err != nil {
					t.Errorf("nft delete: %v: %s", err, out)
				}
			}
		})
	}
	t.Cleanup(light)
	return light
}

// TestE2ELoneWorkerLinkDarkForAMoment: the only worker of a model streams
// three answers when its link goes dark for 2.8 s, past the router's
// silence bound (2.5 s), then comes back: its process and connection
// live. The bridge finds the streams silent, pings the worker, which
// answers once the link is back, and asks it again: each answer arrives
// whole. Before, with no other worker to move to, each query failed with
// UNAVAILABLE ("went silent while answering"). On TCP and on QUIC, real
// processes in two network namespaces.
func TestE2ELoneWorkerLinkDarkForAMoment(t *testing.T) {
	onEachDarkableLink(t, func(t *testing.T, n netnsPair, args netnsArgs) {
		bridge := startNodeLogged(t, "bridge", inNetns(n.a), "error,mtor/router=debug", args("bridge", n.ipA, "--no-detect")...)
		w := startNodeIn(t, "worker", inNetns(n.b), args("worker", n.ipB, "--backend", "demo:delay=100ms", "--join", bridge.value("join"))...)
		t.Cleanup(func() {
			if t.Failed() {
				for _, p := range []*proc{bridge, w} {
					t.Logf("%s:\n%s", p.name, p.outputTail(8000))
				}
			}
		})
		api := bridge.value("api")
		waitPeersIn(t, n.a, api, w.value("peer"))

		const queries = 3
		prompt := func(i int) string {
			return fmt.Sprintf("dark %d %s", i, strings.TrimSpace(strings.Repeat("word ", 40)))
		}
		results := make([]streamedQuery, queries)
		var wg sync.WaitGroup
		for i := range queries {
			wg.Go(func() { results[i] = runStreamedQuery(t.Context(), n.a, api, prompt(i)) })
		}
		// Every answer is streaming by now (each takes about 5 s).
		time.Sleep(1200 * time.Millisecond)
		light := darken(t, n)
		time.Sleep(2800 * time.Millisecond)
		light()
		wg.Wait()
		var worst time.Duration
		for i, r := range results {
			if r.err != nil {
				t.Fatalf("query %d failed after the link was dark 2.8 s: %v", i, r.err)
			}
			if strings.Count(r.text, "[demo answer") != 1 || !strings.HasSuffix(r.text, prompt(i)) {
				t.Fatalf("query %d: answer not whole: %q", i, r.text)
			}
			worst = max(worst, r.maxGap)
		}
		asked := strings.Count(bridge.output(), "a worker fell silent on the query, and no other can take it: pinged")
		t.Logf("%d answers whole; longest pause %s; the worker pinged after a silent stream %d times", queries, worst.Round(time.Millisecond), asked)
		if worst < 2500*time.Millisecond || asked == 0 {
			t.Fatalf("longest pause %s, silent streams pinged %d times: the link's darkness did not reach the silence bound, and the test tested nothing", worst, asked)
		}
	})
}

// netnsArgs are a node's flags for one test: its data dir (name), its
// listen address on ip (the test's transport), the local API, no mDNS,
// announcements every second, then extra.
type netnsArgs func(name, ip string, extra ...string) []string

// onEachDarkableLink runs f on TCP and on QUIC, each with a new pair of
// network namespaces whose link darken can cut.
func onEachDarkableLink(t *testing.T, f func(t *testing.T, n netnsPair, args netnsArgs)) {
	needBinary(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nftables (nft) to darken a link")
	}
	for _, tc := range []struct{ name, listen string }{
		{"tcp", "/ip4/%s/tcp/0"},
		{"quic", "/ip4/%s/udp/0/quic-v1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNetnsPair(t)
			dir := t.TempDir()
			f(t, n, func(name, ip string, extra ...string) []string {
				return append([]string{"--data-dir", filepath.Join(dir, name), "--listen", fmt.Sprintf(tc.listen, ip),
					"--api", "127.0.0.1:0", "--no-mdns", "--announce-interval", "1s"}, extra...)
			})
		})
	}
}
