package webui_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/prometheus/client_golang/prometheus"

	mbridge "github.com/mtor-swarm/mtor/bridge"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestBrowserShowsLedger: the real bridge on a client node of a real
// swarm; after a query the client node routed to the worker, the page's
// ledger card names the worker and what it did for this node.
func TestBrowserShowsLedger(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	worker, client := sw.Workers[0].ID(), sw.Clients[0]
	r := client.Router()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for len(r.Models()) == 0 {
		if ctx.Err() != nil {
			t.Fatal("client node sees no model")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "account for me"},
		func(*pb.Event) error { return nil }); err != nil {
		t.Fatal(err)
	}
	b, err := mbridge.New(r, mbridge.WithRegistry(prometheus.NewRegistry()), mbridge.WithLedger(client.Ledger()))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- b.Serve(sctx, ln) }()
	t.Cleanup(func() {
		stop()
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})

	bctx := browser(t)
	do(t, bctx, "loading the page", chromedp.Navigate("http://"+ln.Addr().String()))
	short := worker.String()
	short = short[len(short)-8:]
	waitJS(t, bctx, "the worker in the ledger card", fmt.Sprintf(`(() => {
		const card = document.getElementById('ledger');
		const row = document.querySelector('#ledger-peers tr[data-peer=%q]');
		return !card.hidden && row && row.textContent.includes(%q) && row.textContent.includes('1 q');
	})()`, worker.String(), short))
	total := run(t, bctx, "reading the ledger total", chromedp.Evaluate[string](`document.getElementById('ledger-total').textContent`))
	if want := "This node consumed 1 q"; len(total) < len(want) || total[:len(want)] != want {
		t.Errorf("ledger total %q, want it to start %q", total, want)
	}

	// A question asked on the page comes back with a countersigned
	// receipt, which "Answered by" marks, and the card counts it.
	waitJS(t, bctx, "the model list", `document.getElementById('model').value === 'demo'`)
	ask(t, bctx, "is this answer signed", 1)
	waitJS(t, bctx, "the signed mark", `document.querySelector('#answers li .stats').textContent.includes('signed')`)
	waitJS(t, bctx, "the second query in the ledger card", fmt.Sprintf(
		`document.querySelector('#ledger-peers tr[data-peer=%q]').textContent.includes('2 q')`, worker.String()))
}
