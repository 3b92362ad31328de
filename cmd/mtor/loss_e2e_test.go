package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/protocol/pb"
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
	rule := fmt.Sprintf("ip saddr %s numgen random mod 100 < %d counter drop", from, lossPercent)
	if out, err := nftLoad(ns, nftInputTable("mtorloss", 0, rule)); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	return func() int { return nftCounted(t, ns, "table", "inet", "mtorloss") }
}

// nftCounted sums the packet counters of what `nft list what...` lists in
// the namespace ns.
func nftCounted(t *testing.T, ns string, what ...string) int {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "nft", "list"}, what...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list: %v: %s", err, out)
	}
	total := 0
	for _, m := range nftCounter.FindAllStringSubmatch(string(out), -1) {
		n, _ := strconv.Atoi(m[1])
		total += n
	}
	return total
}

var nftCounter = regexp.MustCompile(`counter packets (\d+)`)

// TestE2ELossyLink: with 10 % of the packets lost each way between a
// worker's namespace and the bootstrap's and bridge's, on TCP and on
// QUIC, a query sent the moment the worker has joined is answered by a
// bridge without the swarm view (its provider records put and found over
// the lossy link), concurrent streamed queries and chat completions all
// come back whole, and every answer's receipt reaches the worker again,
// countersigned (the chat completions' in batches), across the same link.
func TestE2ELossyLink(t *testing.T) {
	needBinary(t)
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("needs curl to reach a bridge in a network namespace")
	}
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
			bridge := startNodeIn(t, "bridge", inNetns(n.a), args("bridge", n.ipA, "--no-detect", "--swarm-view=false",
				"--bridge", "127.0.0.1:0", "--join", boot.value("join"))...)
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
			// a model's first provider, 15 s once the swarm's catalogue
			// lists it (docs/architecture.md). The query
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

			// Chat completions (no client sees their receipts) are
			// countersigned in batches as their receipts go back to the
			// worker; the node API's came countersigned. Every receipt
			// crosses the lossy link back, and both ledgers verify.
			const chats = 6
			chatErrs := make([]error, chats)
			for i := range chats {
				wg.Go(func() { chatErrs[i] = chatIn(t, n.a, bridge.value("bridge"), prompt(i)) })
			}
			wg.Wait()
			for i, err := range chatErrs {
				if err != nil {
					t.Fatalf("chat completion %d over the lossy link: %v", i, err)
				}
			}
			brID, all := bridge.value("peer"), uint64(1+queries+chats)
			// served: answers the worker gave, more than the queries when
			// one fell silent at the bridge (a lost segment retransmitted
			// again and again) and was asked again of the same worker.
			var confirmed, served uint64
			var wl ledger.Snapshot
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
				confirmed, served, wl = 0, 0, ledgerIn(t, n.b, w.value("api"))
				for _, e := range wl.Peers {
					if e.Peer == brID {
						confirmed, served = e.ServedCountersigned, e.Served.Queries
					}
				}
				if confirmed == all || time.Now().After(deadline) {
					break
				}
			}
			if confirmed != all {
				t.Fatalf("%d of %d receipts came back countersigned to the worker across the lossy link", confirmed, all)
			}
			batched := 0
			for _, rc := range wl.Recent {
				var r pb.Receipt
				if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
					t.Fatal(err)
				}
				if r.GetRouterBatch() != nil {
					batched++
				}
			}
			if batched != chats {
				t.Fatalf("%d receipts at the worker countersigned in a batch, want the %d chat completions'", batched, chats)
			}
			if got := ledgerIn(t, n.a, bridge.value("api")).Total.Consumed.Queries; got != all {
				t.Fatalf("the bridge's ledger holds %d answers, want %d", got, all)
			}
			// Only an answer the bridge did not read stays without its
			// countersignature.
			for _, c := range []struct {
				ns, api     string
				unconfirmed uint64
			}{{n.a, bridge.value("api"), 0}, {n.b, w.value("api"), served - all}} {
				want := fmt.Sprintf(", %d with the worker's only", c.unconfirmed)
				if code, out, stderr := mtorIn(t, c.ns, "ledger", "--api", c.api, "--verify"); code != 0 || !strings.Contains(out, want) {
					t.Fatalf("ledger --verify: exit %d, want %q: %s %s", code, want, out, stderr)
				}
			}
			d := toA() + toB()
			if d == 0 {
				t.Fatal("no packet was dropped: the test tested nothing")
			}
			t.Logf("%s: worker joined in %s; first query, %d streamed answers and %d chat completions whole, %d receipts countersigned back (%d answers served); %d packets dropped",
				tc.name, joinedIn.Round(time.Millisecond), queries, chats, all, served, d)
		})
	}
}

// chatIn posts one chat completion to the bridge at url from inside the
// namespace ns (curl: the bridge listens on that namespace's loopback)
// and wants the demo's whole answer.
func chatIn(t *testing.T, ns, url, prompt string) error {
	t.Helper()
	body, err := json.Marshal(map[string]any{"model": "demo", "messages": []map[string]string{{"role": "user", "content": prompt}}})
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(t.Context(), "ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "60",
		"-H", "Content-Type: application/json", "--data-binary", "@-", "-w", "\n%{http_code}",
		strings.TrimSuffix(url, "/")+"/v1/chat/completions")
	cmd.Stdin = bytes.NewReader(body)
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("curl: %w", err)
	}
	i := bytes.LastIndexByte(out, '\n')
	if i < 0 || string(out[i+1:]) != "200" {
		return fmt.Errorf("not 200: %s", out)
	}
	var c struct {
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(out[:i], &c); err != nil || len(c.Choices) != 1 {
		return fmt.Errorf("not a chat completion (%v): %s", err, out)
	}
	if a := c.Choices[0].Message.Content; strings.Count(a, "[demo answer") != 1 || !strings.HasSuffix(a, strings.TrimSpace(prompt)) {
		return fmt.Errorf("answer not whole: %q", a)
	}
	return nil
}

// ledgerIn is the ledger of the node whose API is api, in the namespace ns.
func ledgerIn(t *testing.T, ns, api string) ledger.Snapshot {
	t.Helper()
	return ledgerFrom(t)(mtorIn(t, ns, "ledger", "--api", api, "--json"))
}

// ledgerFrom reads the output of `mtor ledger --json`.
func ledgerFrom(t *testing.T) func(code int, stdout, stderr string) ledger.Snapshot {
	return func(code int, stdout, stderr string) ledger.Snapshot {
		t.Helper()
		if code != 0 {
			t.Fatalf("ledger --json: exit %d: %s", code, stderr)
		}
		var s ledger.Snapshot
		if err := json.Unmarshal([]byte(stdout), &s); err != nil {
			t.Fatalf("ledger --json: %v: %s", err, stdout)
		}
		return s
	}
}
