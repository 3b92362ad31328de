package webui_test

import (
	"context"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"
	"github.com/libp2p/go-libp2p/core/crypto"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// TestBrowserMarksCatalogueModels: the page of a bridge without the swarm
// view lists a model it knows only from the swarm's model catalogue (real
// nodes: the bootstrap and the worker keep the view and publish it),
// marked as such, and answers it; once the node has routed to the model
// and holds its worker, the mark goes. On TCP and on QUIC.
func TestBrowserMarksCatalogueModels(t *testing.T) {
	for _, tc := range []struct {
		name   string
		listen string
		opts   []swarmtest.Option
	}{
		{"tcp", "/ip4/127.0.0.1/tcp/0", nil},
		{"quic", "/ip4/127.0.0.1/udp/0/quic-v1", []swarmtest.Option{swarmtest.QUIC()}},
	} {
		t.Run(tc.name, func(t *testing.T) { testBrowserMarksCatalogueModels(t, tc.listen, tc.opts...) })
	}
}

func testBrowserMarksCatalogueModels(t *testing.T, listen string, opts ...swarmtest.Option) {
	sw := swarmtest.New(t, append([]swarmtest.Option{swarmtest.Workers(1)}, opts...)...)
	key, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	client, err := node.New(context.Background(), node.WithIdentity(key), node.WithListenAddrs(listen),
		node.WithMDNS(false), node.WithJoin(sw.Bootstrap.JoinLine()), node.WithSwarmView(false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	url := bridge(t, client.Router(), client.ID().String())
	ctx := browser(t)

	do(t, ctx, "loading the page", chromedp.Navigate(url))
	marked := `(() => { const o = document.querySelector('#model option[value="demo"]');
		return !!o && o.dataset.catalog === 'true' && o.textContent === 'demo · catalogue'; })()`
	waitJS(t, ctx, "the catalogue's model, marked", marked)
	if run(t, ctx, "reading the picker", chromedp.Evaluate[string](`document.getElementById('model').value`)) != "demo" {
		t.Fatal("the catalogue's model is not the one picked")
	}

	question := "hello from a page without the swarm view"
	ask(t, ctx, question, 1)
	answer := run(t, ctx, "reading the answer", chromedp.Evaluate[string](`document.querySelector('.msg.assistant .bubble').textContent`))
	if !strings.Contains(answer, "You said: "+question) {
		t.Fatalf("answer %q does not echo the question", answer)
	}
	waitJS(t, ctx, "the mark gone once the node holds the worker",
		`(() => { const o = document.querySelector('#model option[value="demo"]');
			return !!o && o.dataset.catalog === undefined && o.textContent === 'demo'; })()`)
}
