package webui_test

import (
	"context"
	"sync"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// preferSeen is a real router that notes the energy preference each
// query reaches it with.
type preferSeen struct {
	ws.Swarm
	mu   sync.Mutex
	seen []router.EnergyPreference
}

func (p *preferSeen) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	p.mu.Lock()
	p.seen = append(p.seen, router.EnergyPreferenceOf(ctx))
	p.mu.Unlock()
	return p.Swarm.Query(ctx, req, h)
}

func (p *preferSeen) last() []router.EnergyPreference {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]router.EnergyPreference(nil), p.seen...)
}

// TestBrowserRoutePreference: the page's Route picker travels with each
// question to the bridge's router: the node's default at first, then
// least energy, then fastest, each question answered.
func TestBrowserRoutePreference(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	client := sw.Clients[0]
	seen := &preferSeen{Swarm: client.Router()}
	url := bridge(t, seen, client.ID().String())
	ctx := browser(t)

	do(t, ctx, "loading the page", chromedp.Navigate(url))
	waitJS(t, ctx, "the connection and the model list",
		`document.getElementById('conn').dataset.state === 'open' && document.getElementById('model').value === 'demo'`)
	want := []router.EnergyPreference{router.EnergyDefault}
	ask(t, ctx, "as the node likes", 1)
	for i, tc := range []struct {
		option string
		want   router.EnergyPreference
	}{{"energy", router.EnergyPrefer}, {"latency", router.EnergyIgnore}} {
		do(t, ctx, "choosing "+tc.option, chromedp.SetValue(chromedp.CSS("#prefer"), tc.option))
		ask(t, ctx, "route by "+tc.option, i+2)
		want = append(want, tc.want)
	}
	if got := seen.last(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("the router saw preferences %v, want %v", got, want)
	}
}
