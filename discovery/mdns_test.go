package discovery

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
)

// mDNS needs multicast, which loopback lacks, and must not leak onto this
// machine's real network. So the test builds a tiny LAN of its own: two
// network namespaces joined by a veth pair, and runs one node in each (a
// child process: this test binary, re-run as TestMDNSChild). Neither node
// is given a join address; they must find each other by mDNS, connect, and
// exchange announcements.

const (
	mdnsChildEnv  = "MTOR_MDNS_CHILD_LISTEN"
	mdnsChildWait = 90 * time.Second
)

func TestMDNSNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (ip) to create network namespaces")
	}
	id := os.Getpid() % 100000
	nsA, nsB := fmt.Sprintf("mtor-mdns-%d-a", id), fmt.Sprintf("mtor-mdns-%d-b", id)
	vethA, vethB := fmt.Sprintf("mtma%d", id), fmt.Sprintf("mtmb%d", id)
	// 10.231.x.0/24 exists only inside the namespaces.
	net := fmt.Sprintf("10.231.%d", id%250)
	ipA, ipB := net+".1", net+".2"

	t.Cleanup(func() {
		// Deleting a namespace also deletes the veth end inside it.
		_ = exec.Command("ip", "netns", "del", nsA).Run()
		_ = exec.Command("ip", "netns", "del", nsB).Run()
	})
	for _, args := range [][]string{
		{"netns", "add", nsA},
		{"netns", "add", nsB},
		{"link", "add", vethA, "type", "veth", "peer", "name", vethB},
		{"link", "set", vethA, "netns", nsA},
		{"link", "set", vethB, "netns", nsB},
		{"-n", nsA, "addr", "add", ipA + "/24", "dev", vethA},
		{"-n", nsB, "addr", "add", ipB + "/24", "dev", vethB},
		{"-n", nsA, "link", "set", vethA, "up"},
		{"-n", nsB, "link", "set", vethB, "up"},
		{"-n", nsA, "link", "set", "lo", "up"},
		{"-n", nsB, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			if args[0] == "netns" && args[1] == "add" {
				t.Skipf("cannot create a network namespace here: ip %s: %v: %s", strings.Join(args, " "), err, out)
			}
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), mdnsChildWait+30*time.Second)
	defer cancel()
	a := startMDNSChild(ctx, t, nsA, ipA)
	b := startMDNSChild(ctx, t, nsB, ipB)
	idA, idB := a.line(t, "PEER "), b.line(t, "PEER ")
	// Each child reports when its table holds both nodes: found by mDNS,
	// connected, announced over gossipsub.
	seenA, seenB := a.line(t, "TABLE "), b.line(t, "TABLE ")
	for _, c := range []struct{ seen, self, other string }{{seenA, idA, idB}, {seenB, idB, idA}} {
		if !strings.Contains(c.seen, c.self) || !strings.Contains(c.seen, c.other) {
			t.Errorf("node %s table %q, want both %s and %s", c.self, c.seen, c.self, c.other)
		}
	}
	a.stop(t)
	b.stop(t)
	if testing.Verbose() {
		t.Logf("node a:\n%s\nnode b:\n%s", a.output(), b.output())
	}
}

type mdnsChild struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	out   *strings.Builder
	mu    *sync.Mutex
	name  string
}

func startMDNSChild(ctx context.Context, t *testing.T, ns, ip string) *mdnsChild {
	t.Helper()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestMDNSChild$", "-test.v", "-test.count=1")
	// Its dials and what mDNS reports, for a failure message.
	cmd.Env = append(os.Environ(), mdnsChildEnv+"=/ip4/"+ip+"/tcp/0", "GOLOG_LOG_LEVEL=error,mtor/discovery=debug")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &mdnsChild{cmd: cmd, stdin: stdin, lines: make(chan string, 64), out: &strings.Builder{}, mu: &sync.Mutex{}, name: ns}
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.mu.Lock()
			c.out.WriteString(sc.Text() + "\n")
			c.mu.Unlock()
			select {
			case c.lines <- sc.Text():
			default: // only the protocol lines matter; never block the child
			}
		}
	}()
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return c
}

func (c *mdnsChild) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// line waits for the child's next line starting with prefix.
func (c *mdnsChild) line(t *testing.T, prefix string) string {
	t.Helper()
	deadline := time.After(mdnsChildWait)
	for {
		select {
		case l, ok := <-c.lines:
			if !ok {
				t.Fatalf("%s exited before printing %q:\n%s", c.name, prefix, c.output())
			}
			if strings.HasPrefix(l, prefix) {
				return strings.TrimPrefix(l, prefix)
			}
		case <-deadline:
			t.Fatalf("%s never printed %q:\n%s", c.name, prefix, c.output())
		}
	}
}

func (c *mdnsChild) stop(t *testing.T) {
	t.Helper()
	_ = c.stdin.Close()
	if err := c.cmd.Wait(); err != nil {
		t.Errorf("%s: %v:\n%s", c.name, err, c.output())
	}
}

// TestMDNSChild is one node of TestMDNSNetns, run inside a namespace.
func TestMDNSChild(t *testing.T) {
	listen := os.Getenv(mdnsChildEnv)
	if listen == "" {
		t.Skip("run by TestMDNSNetns only")
	}
	h, err := libp2p.New(libp2p.ListenAddrStrings(listen))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d := newDiscovery(t, h, WithMDNS(true))
	if d.mdns == nil {
		t.Fatal("mDNS did not start")
	}
	fmt.Printf("PEER %s\n", h.ID())
	heartbeat(t, d, "m", 300*time.Millisecond)
	waitTable(t, d, "both nodes", func(es []Entry) bool { return len(es) == 2 })
	var ids []string
	for _, e := range d.Table().Snapshot() {
		ids = append(ids, e.Peer.String())
	}
	fmt.Printf("TABLE %s\n", strings.Join(ids, " "))
	// Stay up until the parent has heard from both nodes.
	_, _ = io.Copy(io.Discard, os.Stdin)
}
