package main

// The NAT suite: real `mtor node` processes in network namespaces joined
// only to each other — a "public" segment (100.64.0.0/10, one address per
// /16) with a bootstrap node and two relays, and two NAT routers that
// masquerade a private LAN each (10.1.0.0/24 with a demo worker, 10.2.0.0/24
// with a client node). Nothing is routed to the host's own network.
//
// NAT kinds, built with nftables in the router's namespace:
//   - forwarded: port-restricted masquerading plus a port forward of the
//     worker's listen port (endpoint-independent for that port), with
//     --announce of the router's public address;
//   - restricted: Linux masquerading: endpoint-independent mapping,
//     address-and-port-dependent filtering (a port-restricted cone);
//   - symmetric: masquerading with fully-random ports (a new mapping per
//     destination).
//
// MTOR_NAT_STREAM sets the duration of the long relayed stream (default
// 15 s here; `make test-nat` runs 150 s); MTOR_NAT_PAIRS picks pairs, e.g.
// "restricted/symmetric"; MTOR_NAT_REPORT names a file for the figures.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/router"
)

// TestHelperHTTPGet is not a test: the NAT suite runs the test binary in
// a namespace with MTOR_TEST_GET=URL to read a node's control API there.
func TestHelperHTTPGet(t *testing.T) {
	u := os.Getenv("MTOR_TEST_GET")
	if u == "" {
		t.Skip("helper for the NAT suite")
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(u)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(os.Stdout, resp.Body)
	os.Exit(0)
}

type natKind string

const (
	natForwarded  natKind = "forwarded"
	natRestricted natKind = "restricted"
	natSymmetric  natKind = "symmetric"
)

// natNet is one topology: namespaces, links and NAT rules.
type natNet struct {
	t   *testing.T
	id  int
	ns  map[string]string // role -> namespace name
	ips map[string]string // role -> its address
}

const natListenPort = "4001"

func needNAT(t *testing.T) {
	t.Helper()
	needBinary(t)
	if os.Geteuid() != 0 {
		t.Skip("the NAT suite needs root to create network namespaces")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("the NAT suite needs %s (apt-get install iproute2 nftables)", tool)
		}
	}
}

func (n *natNet) run(args ...string) {
	n.t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		n.t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (n *natNet) in(role string, args ...string) {
	n.t.Helper()
	n.run(append([]string{"ip", "netns", "exec", n.ns[role]}, args...)...)
}

// newNATNet builds the topology with worker behind NAT a and client
// behind NAT b.
func newNATNet(t *testing.T, a, b natKind) *natNet {
	t.Helper()
	n := &natNet{t: t, id: rand.IntN(90000) + 10000, ns: map[string]string{}, ips: map[string]string{
		"boot": "100.64.0.1", "r1": "100.65.0.1", "r2": "100.66.0.1", "natA": "100.67.0.1", "natB": "100.68.0.1",
		"worker": "10.1.0.2", "client": "10.2.0.2",
	}}
	roles := []string{"sw", "boot", "r1", "r2", "natA", "natB", "worker", "client"}
	for _, r := range roles {
		n.ns[r] = fmt.Sprintf("mtor-nat-%d-%s", n.id, r)
	}
	t.Cleanup(func() {
		for _, r := range roles {
			_ = exec.Command("ip", "netns", "del", n.ns[r]).Run()
		}
	})
	if out, err := exec.Command("ip", "netns", "add", n.ns["sw"]).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace here: %v: %s", err, out)
	}
	for _, r := range roles[1:] {
		n.run("ip", "netns", "add", n.ns[r])
	}
	for _, r := range roles {
		n.in(r, "ip", "link", "set", "lo", "up")
	}
	// The public segment: a bridge in "sw", one veth per public host.
	n.in("sw", "ip", "link", "add", "br0", "type", "bridge")
	n.in("sw", "ip", "link", "set", "br0", "up")
	links := 0
	link := func(a, ifa, b, ifb string) {
		links++
		tmpA, tmpB := fmt.Sprintf("m8%d%02da", n.id, links), fmt.Sprintf("m8%d%02db", n.id, links)
		n.run("ip", "link", "add", tmpA, "type", "veth", "peer", "name", tmpB)
		n.run("ip", "link", "set", tmpA, "netns", n.ns[a])
		n.run("ip", "link", "set", tmpB, "netns", n.ns[b])
		n.in(a, "ip", "link", "set", tmpA, "name", ifa)
		n.in(b, "ip", "link", "set", tmpB, "name", ifb)
		n.in(a, "ip", "link", "set", ifa, "up")
		n.in(b, "ip", "link", "set", ifb, "up")
	}
	for _, r := range []string{"boot", "r1", "r2", "natA", "natB"} {
		link(r, "wan", "sw", "p"+r)
		n.in("sw", "ip", "link", "set", "p"+r, "master", "br0")
		n.in(r, "ip", "addr", "add", n.ips[r]+"/10", "dev", "wan")
	}
	for _, p := range []struct{ router, host, net string }{{"natA", "worker", "10.1.0"}, {"natB", "client", "10.2.0"}} {
		link(p.host, "eth0", p.router, "lan")
		n.in(p.router, "ip", "addr", "add", p.net+".1/24", "dev", "lan")
		n.in(p.host, "ip", "addr", "add", p.net+".2/24", "dev", "eth0")
		n.in(p.host, "ip", "route", "add", "default", "via", p.net+".1")
		n.in(p.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	}
	n.nat("natA", "worker", a)
	n.nat("natB", "client", b)
	return n
}

// nat installs the masquerading rules of kind k on router, whose LAN host
// is host.
func (n *natNet) nat(router, host string, k natKind) {
	masq := "masquerade"
	if k == natSymmetric {
		masq = "masquerade fully-random"
	}
	rules := fmt.Sprintf(`table ip nat {
	chain post { type nat hook postrouting priority srcnat; policy accept; oifname "wan" %s; }
	chain pre { type nat hook prerouting priority dstnat; policy accept; }
}
table ip filter {
	chain forward_lan { type filter hook forward priority filter; policy drop;
		iifname "lan" oifname "wan" accept
		ct state established,related accept
		ct status dnat accept
	}
}
`, masq)
	if k == natForwarded {
		rules += fmt.Sprintf("add rule ip nat pre iifname \"wan\" tcp dport %s dnat to %s:%s\n", natListenPort, n.ips[host], natListenPort)
		rules += fmt.Sprintf("add rule ip nat pre iifname \"wan\" udp dport %s dnat to %s:%s\n", natListenPort, n.ips[host], natListenPort)
	}
	cmd := exec.Command("ip", "netns", "exec", n.ns[router], "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		if strings.Contains(string(out), "not supported") || strings.Contains(string(out), "No such file") {
			n.t.Skipf("the kernel lacks nftables NAT: %v: %s", err, out)
		}
		n.t.Fatalf("nft: %v: %s", err, out)
	}
}

func (n *natNet) prefix(role string) []string { return inNetns(n.ns[role]) }

// start runs `mtor node` for role with a data dir of its own.
func (n *natNet) start(role, dir string, args ...string) *proc {
	n.t.Helper()
	base := []string{"--data-dir", dir, "--no-mdns", "--api", "127.0.0.1:5050",
		"--listen", "/ip4/0.0.0.0/tcp/" + natListenPort, "--listen", "/ip4/0.0.0.0/udp/" + natListenPort + "/quic-v1"}
	return startNodeIn(n.t, role, n.prefix(role), append(base, args...)...)
}

// get reads path of role's control API.
func (n *natNet) get(role, path string, v any) error {
	cmd := exec.Command("ip", "netns", "exec", n.ns[role], os.Args[0], "-test.run=^TestHelperHTTPGet$", "-test.short")
	cmd.Env = append(os.Environ(), "MTOR_TEST_GET=http://127.0.0.1:5050"+path)
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("GET %s in %s: %w", path, role, err)
	}
	return json.Unmarshal(out, v)
}

// query runs `mtor query` in the client's namespace; prompt "-" reads stdin.
func (n *natNet) query(ctx context.Context, timeout time.Duration, prompt string, stdin string) (string, error) {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", n.ns["client"], e2eBin, "query", "--api", "127.0.0.1:5050",
		"--model", "demo", "--timeout", timeout.String(), prompt)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%w: %s", err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// path is how the client is connected to the worker: direct or relayed.
func (n *natNet) path(worker string) (kind, relay string) {
	var peers []router.PeerView
	if err := n.get("client", "/v1/peers", &peers); err != nil {
		return "", ""
	}
	for _, p := range peers {
		if p.Peer == worker {
			return p.Path, p.Via
		}
	}
	return "", ""
}

// relays are the relays the worker holds reservations on.
func (n *natNet) relays() []string {
	var id api.IDInfo
	if err := n.get("worker", "/v1/id", &id); err != nil {
		return nil
	}
	var out []string
	for _, r := range id.Relays {
		out = append(out, r.Peer)
	}
	return out
}

// natFigures is what the suite measured for one NAT pair.
type natFigures struct {
	pair        string
	firstAnswer time.Duration
	ok, total   int
	p50         time.Duration
	path        string
	stream      string
	relayKill   string
	reReserve   time.Duration
}

func natStreamDuration() time.Duration {
	if s := os.Getenv("MTOR_NAT_STREAM"); s != "" {
		if d, err := time.ParseDuration(s); err == nil && d > 0 {
			return d
		}
	}
	return 15 * time.Second
}

// Long streams echo a prompt of streamWords words of 7 bytes: > 128 KiB.
const streamWords = 20000

func streamPrompt(words int) string {
	var b strings.Builder
	for i := range words {
		fmt.Fprintf(&b, "w%05d ", i%100000)
	}
	return strings.TrimSpace(b.String())
}

func TestNATSuite(t *testing.T) {
	needNAT(t)
	pairs := [][2]natKind{
		{natForwarded, natRestricted},
		{natRestricted, natRestricted},
		{natRestricted, natSymmetric},
		{natSymmetric, natRestricted},
	}
	if s := os.Getenv("MTOR_NAT_PAIRS"); s != "" {
		pairs = nil
		for _, p := range strings.Split(s, ",") {
			a, b, _ := strings.Cut(p, "/")
			pairs = append(pairs, [2]natKind{natKind(a), natKind(b)})
		}
	}
	var figs []natFigures
	for i, p := range pairs {
		name := string(p[0]) + "/" + string(p[1])
		t.Run(strings.ReplaceAll(name, "/", "-"), func(t *testing.T) {
			// The relay restart (1 h lock-out) is checked on the first
			// relayed pair only: it takes a while and is the same each time.
			f := runNATPair(t, p[0], p[1], i == 1 || len(pairs) == 1)
			figs = append(figs, f)
		})
	}
	var rep strings.Builder
	fmt.Fprintf(&rep, "| worker NAT / client NAT | first answer | answered | p50 | path | %s relayed stream | relay killed mid-stream | re-reservation after relay restart |\n|---|---|---|---|---|---|---|---|\n", natStreamDuration())
	for _, f := range figs {
		rr := "–"
		if f.reReserve > 0 {
			rr = f.reReserve.Round(10 * time.Millisecond).String()
		}
		fmt.Fprintf(&rep, "| %s | %s | %d/%d | %s | %s | %s | %s | %s |\n", f.pair, f.firstAnswer.Round(10*time.Millisecond),
			f.ok, f.total, f.p50.Round(100*time.Microsecond), f.path, f.stream, f.relayKill, rr)
	}
	t.Logf("NAT figures:\n%s", rep.String())
	if out := os.Getenv("MTOR_NAT_REPORT"); out != "" {
		_ = os.WriteFile(out, []byte(rep.String()), 0o644)
	}
}

func runNATPair(t *testing.T, wk, ck natKind, restart bool) natFigures {
	f := natFigures{pair: string(wk) + " / " + string(ck), total: 50}
	n := newNATNet(t, wk, ck)
	dir := t.TempDir()
	d := func(name string) string { return filepath.Join(dir, name) }
	boot := n.start("boot", d("boot"), "--no-detect", "--reachability", "public")
	join := "/ip4/" + n.ips["boot"] + "/tcp/" + natListenPort + "/p2p/" + boot.value("peer")
	relays := map[string]*proc{}
	for _, r := range []string{"r1", "r2"} {
		relays[r] = n.start(r, d(r), "--no-detect", "--relay", "--join", join)
	}
	client := n.start("client", d("client"), "--no-detect", "--join", join)

	long := natStreamDuration()
	delay := long / streamWords
	wargs := []string{"--backend", "demo:delay=" + delay.String(), "--join", join}
	if wk == natForwarded {
		wargs = append(wargs, "--announce", "/ip4/"+n.ips["natA"]+"/tcp/"+natListenPort)
	}
	start := time.Now()
	worker := n.start("worker", d("worker"), wargs...)
	wid := worker.value("peer")

	// Reachable and answering within 15 s of its start.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var lastErr error
	for {
		if _, err := n.query(ctx, 3*time.Second, "first", ""); err == nil {
			break
		} else {
			lastErr = err
		}
		if time.Since(start) > 15*time.Second {
			t.Fatalf("%s: no answer within 15 s of the worker's start: %v\nworker:\n%s", f.pair, lastErr, worker.output())
		}
		time.Sleep(200 * time.Millisecond)
	}
	f.firstAnswer = time.Since(start)
	kind, via := n.path(wid)
	f.path = kind
	if wk == natForwarded {
		// Its --announce address makes it public: no relays, and nothing
		// reaches it through one. (The client's path to it reads "" in
		// this run: the connection is not kept after the query; see
		// docs/benchmarks.md.)
		if r := n.relays(); kind == "relayed" || len(r) > 0 {
			t.Errorf("%s: a port-forwarded worker with --announce is reached %q and holds relays %v, want direct and none", f.pair, kind, r)
		}
	}
	if wk != natForwarded && kind != "relayed" {
		t.Errorf("%s: path %q, want relayed (hole punching cannot succeed in this address plan)", f.pair, kind)
	}

	// 50 queries, 5 at a time.
	var mu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	sem := make(chan struct{}, 5)
	for i := range f.total {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			qs := time.Now()
			out, err := n.query(ctx, 30*time.Second, fmt.Sprintf("question %d", i), "")
			mu.Lock()
			defer mu.Unlock()
			if err == nil && strings.Contains(out, fmt.Sprintf("question %d", i)) {
				f.ok++
				lat = append(lat, time.Since(qs))
			} else {
				t.Errorf("%s: query %d: %v %q", f.pair, i, err, out)
			}
		})
	}
	wg.Wait()
	slices.Sort(lat)
	if len(lat) > 0 {
		f.p50 = lat[len(lat)/2]
	}

	// A long stream (> 128 KiB, MTOR_NAT_STREAM long) completes.
	prompt := streamPrompt(streamWords)
	ss := time.Now()
	out, err := n.query(ctx, long+2*time.Minute, "-", prompt)
	if err != nil || !strings.HasSuffix(strings.TrimSpace(out), prompt) {
		t.Errorf("%s: long stream: %v (%d of %d bytes)", f.pair, err, len(out), len(prompt))
		f.stream = "FAILED"
	} else {
		f.stream = fmt.Sprintf("%d KiB in %s, %s", len(out)>>10, time.Since(ss).Round(100*time.Millisecond), kind)
	}

	// A relay killed mid-stream loses no answer.
	if kind == "relayed" {
		kill := ""
		for r, p := range relays {
			if p.value("peer") == via {
				kill = r
			}
		}
		words := int(8 * time.Second / delay)
		prompt := streamPrompt(min(words, streamWords))
		type res struct {
			out string
			err error
		}
		done := make(chan res, 1)
		go func() {
			out, err := n.query(ctx, 2*time.Minute, "-", prompt)
			done <- res{out, err}
		}()
		time.Sleep(3 * time.Second)
		if kill == "" {
			t.Errorf("%s: the client's relay %q is none of ours", f.pair, via)
		} else {
			_ = relays[kill].cmd.Process.Signal(syscall.SIGKILL)
			<-relays[kill].exited
		}
		r := <-done
		if r.err != nil || !strings.HasSuffix(strings.TrimSpace(r.out), prompt) {
			t.Errorf("%s: answer lost when relay %s was killed mid-stream: %v (%d of %d bytes)\nclient:\n%s", f.pair, kill, r.err, len(r.out), len(prompt), client.output())
			f.relayKill = "LOST"
		} else {
			k2, _ := n.path(wid)
			f.relayKill = "answer complete, now " + k2
		}
		// The worker reserves on the restarted relay within seconds.
		if restart && kill != "" {
			rs := time.Now()
			relays[kill] = n.start(kill, d(kill), "--no-detect", "--relay", "--join", join)
			for !slices.Contains(n.relays(), via) {
				if time.Since(rs) > 30*time.Second {
					t.Fatalf("%s: no reservation on the restarted relay within 30 s (holds %v)\nworker:\n%s", f.pair, n.relays(), worker.output())
				}
				time.Sleep(100 * time.Millisecond)
			}
			f.reReserve = time.Since(rs)
		}
	} else {
		f.relayKill = "– (direct)"
	}
	t.Logf("%s: first answer %s, %d/%d answered, p50 %s, path %s, stream %s, relay kill %s, re-reservation %s",
		f.pair, f.firstAnswer, f.ok, f.total, f.p50, f.path, f.stream, f.relayKill, f.reReserve)
	return f
}
