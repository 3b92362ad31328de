package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// lossPercent of the packets between the two namespaces are lost, each
// way.
const lossPercent = 10

// addLoss makes the namespace ns lose lossPercent of the packets that
// come in from the address from, and returns how many it lost so far.
// nftables (the kernel here has no netem), on the way in: a packet
// dropped on its way out fails the sender's send call (EPERM), which is
// no loss in the network (quic-go ends the connection on it).
func addLoss(t *testing.T, ns, from string) (dropped func() int) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nftables (nft) to lose packets")
	}
	rules := fmt.Sprintf(`table inet mtorloss {
	chain in {
		type filter hook input priority 0;
		ip saddr %s numgen random mod 100 < %d counter drop
	}
}
`, from, lossPercent)
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	counter := regexp.MustCompile(`counter packets (\d+)`)
	return func() int {
		out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "mtorloss").CombinedOutput()
		if err != nil {
			t.Fatalf("nft list: %v: %s", err, out)
		}
		total := 0
		for _, m := range counter.FindAllStringSubmatch(string(out), -1) {
			n, _ := strconv.Atoi(m[1])
			total += n
		}
		return total
	}
}

// TestE2ELossyLink: with 10 % of the packets lost each way between a
// worker's namespace and the bootstrap's and bridge's, on TCP and on
// QUIC, a query sent the moment the worker has joined is answered by a
// bridge without the swarm view (its provider records put and found over
// the lossy link), and concurrent streamed queries all come back whole.
func TestE2ELossyLink(t *testing.T) {
	needBinary(t)
	for _, tc := range []struct{ name, listen string }{
		{"tcp", "/ip4/%s/tcp/0"},
		{"quic", "/ip4/%s/udp/0/quic-v1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNetnsPair(t)
			toA, toB := addLoss(t, n.a, n.ipB), addLoss(t, n.b, n.ipA)
			dir := t.TempDir()
			args := func(name, ip string, extra ...string) []string {
				return append([]string{"--data-dir", filepath.Join(dir, name), "--listen", fmt.Sprintf(tc.listen, ip),
					"--api", "127.0.0.1:0", "--no-mdns"}, extra...)
			}
			boot := startNodeIn(t, "bootstrap", inNetns(n.a), args("boot", n.ipA, "--no-detect")...)
			bridge := startNodeIn(t, "bridge", inNetns(n.a), args("bridge", n.ipA, "--no-detect", "--swarm-view=false", "--join", boot.value("join"))...)
			started := time.Now()
			w := startNodeIn(t, "worker", inNetns(n.b), args("worker", n.ipB, "--backend", "demo:delay=20ms", "--join", boot.value("join"))...)
			t.Cleanup(func() {
				if t.Failed() {
					for _, p := range []*proc{boot, bridge, w} {
						t.Logf("%s:\n%s", p.name, p.output())
					}
				}
			})

			// The worker's own join crosses the lossy link: a lost SYN
			// costs a second, two cost three, and the bridge waits 5 s for
			// a model's first provider (docs/architecture.md). The query
			// goes as soon as the worker says it joined, which is when its
			// operator would send one; its provider record is put after.
			w.waitOutput("joined: ", time.Minute)
			joinedIn := time.Since(started)
			code, stdout, stderr := mtorIn(t, n.a, "query", "--api", bridge.value("api"), "--model", "demo", "--json", "first words")
			out := queryAnswer(t, "first query right after the worker joined", code, stdout, stderr)
			if out.Peer != w.value("peer") {
				t.Fatalf("answered by %q, want the worker %s", out.Peer, w.value("peer"))
			}

			const queries = 8
			prompt := func(i int) string { return fmt.Sprintf("lossy %d %s", i, strings.Repeat("word ", 20)) }
			results := make([]streamedQuery, queries)
			var wg sync.WaitGroup
			for i := range queries {
				wg.Go(func() { results[i] = runStreamedQuery(t.Context(), n.a, bridge.value("api"), prompt(i)) })
			}
			wg.Wait()
			for i, r := range results {
				if r.err != nil {
					t.Fatalf("query %d over the lossy link: %v", i, r.err)
				}
				if strings.Count(r.text, "[demo answer") != 1 || !strings.HasSuffix(r.text, strings.TrimSpace(prompt(i))) {
					t.Fatalf("query %d: answer not whole: %q", i, r.text)
				}
			}
			d := toA() + toB()
			if d == 0 {
				t.Fatal("no packet was dropped: the test tested nothing")
			}
			t.Logf("%s: worker joined in %s; first query and %d streamed answers whole; %d packets dropped", tc.name, joinedIn.Round(time.Millisecond), queries, d)
		})
	}
}
