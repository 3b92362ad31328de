package node_test

import (
	"context"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/node/worker"
)

// switchableProxy forwards to the engine on a fixed loopback address and
// can be taken down and brought back on the same address, as a model
// server restarting would be.
type switchableProxy struct {
	addr string
	srv  *http.Server
	to   *url.URL
}

func (p *switchableProxy) up(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.srv = &http.Server{Handler: httputil.NewSingleHostReverseProxy(p.to)}
	go p.srv.Serve(ln)
}

func (p *switchableProxy) down() { _ = p.srv.Close() }

func TestBackendHealthFallsAndRecovers(t *testing.T) {
	e := enginetest.Start(t)
	to, _ := url.Parse(e.URL())
	p := &switchableProxy{addr: "127.0.0.1:0", to: to}
	p.up(t)
	defer p.down()
	b, err := openai.New("http://" + p.addr)
	if err != nil {
		t.Fatal(err)
	}
	w := worker.New([]backend.Backend{b})
	ctx := context.Background()
	w.Refresh(ctx)
	if len(w.Capabilities()) != 1 || w.Health() != 100 {
		t.Fatalf("healthy start: caps %v health %d", w.Capabilities(), w.Health())
	}

	p.down()
	var scores []uint32
	for i := 0; i < 3; i++ {
		w.Refresh(ctx)
		scores = append(scores, w.Health())
		if i == 0 && len(w.Capabilities()) != 1 {
			t.Fatal("one failed probe withdrew the backend's model")
		}
	}
	if !(scores[0] < 100 && scores[1] < scores[0] && scores[2] < scores[1]) {
		t.Fatalf("health did not fall step by step: %v", scores)
	}
	if len(w.Capabilities()) != 0 {
		t.Fatal("a dead backend's model is still offered")
	}
	if st := w.Backends()[0]; st.Breaker != "open" {
		t.Fatalf("breaker %s after 3 failed probes, want open", st.Breaker)
	}

	p.up(t)
	w.Refresh(ctx)
	if len(w.Capabilities()) != 1 {
		t.Fatal("model did not come back with its backend")
	}
	if st := w.Backends()[0]; st.Breaker != "closed" {
		t.Fatalf("breaker %s after the backend returned, want closed", st.Breaker)
	}
	recovered := w.Health()
	if recovered <= scores[2] || recovered == 100 {
		t.Fatalf("health after recovery = %d: want higher than %d but still short of 100 (gradual)", recovered, scores[2])
	}
}
