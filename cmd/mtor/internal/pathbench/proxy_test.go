package pathbench_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// proxyEnv, when set, makes the test binary serve the Go proxy to its
// upstream URL instead of running tests: the bench runs the proxy as its
// own process, and some faults show only there.
const proxyEnv = "MTOR_PATHBENCH_PROXY_UPSTREAM"

func TestMain(m *testing.M) {
	if up := os.Getenv(proxyEnv); up != "" {
		os.Exit(serveProxyProcess(up))
	}
	os.Exit(m.Run())
}

func serveProxyProcess(upstream string) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("proxy: http://%s\n", ln.Addr())
	if err := pathbench.ServeProxy(context.Background(), ln, upstream); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// startProxyProcess runs this test binary as the proxy to upstream and
// returns its URL; the process is killed at the end of the test.
func startProxyProcess(t *testing.T, upstream string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), proxyEnv+"="+upstream)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	sc := bufio.NewScanner(out)
	if !sc.Scan() {
		t.Fatalf("proxy process printed no address: %v", sc.Err())
	}
	url, ok := strings.CutPrefix(sc.Text(), "proxy: ")
	if !ok {
		t.Fatalf("proxy process printed %q", sc.Text())
	}
	return url
}

// TestProxiesStreamWholeAnswers: the baselines (Go's reverse proxy in
// this process and as its own process, as the bench runs it, and nginx
// where installed) pass every answer whole.
func TestProxiesStreamWholeAnswers(t *testing.T) {
	be, err := pathbench.StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = pathbench.ServeProxy(ctx, ln, be.URL()) }()
	urls := map[string]string{
		"direct":           be.URL(),
		"go-proxy":         "http://" + ln.Addr().String(),
		"go-proxy-process": startProxyProcess(t, be.URL()),
	}
	if bin := pathbench.NginxPath(); bin != "" {
		ng, err := pathbench.StartNginx(ctx, bin, strings.TrimPrefix(be.URL(), "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer ng.Close()
		urls["nginx"] = ng.URL()
	}
	for name, url := range urls {
		for _, conc := range []int{1, 16} {
			cl := pathbench.NewClient(url, pathbench.Model, conc)
			r := cl.Run(ctx, 1000, conc)
			cl.Close()
			if r.Errors > 0 {
				t.Errorf("%s at %d: %d of %d failed, first: %s", name, conc, r.Errors, r.Queries, r.FirstError)
			}
		}
	}
}
