package pathbench_test

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestProxiesStreamWholeAnswers: the baselines (Go's reverse proxy, and
// nginx where installed) pass every answer whole.
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
	urls := map[string]string{"direct": be.URL(), "go-proxy": "http://" + ln.Addr().String()}
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
			r := cl.Run(ctx, 300, conc)
			cl.Close()
			if r.Errors != 0 {
				t.Errorf("%s at %d: %d of 300 failed, first: %s", name, conc, r.Errors, r.FirstError)
			}
		}
	}
}
