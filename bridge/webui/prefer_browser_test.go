package webui_test

import (
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/router"
)

// TestBrowserRoutePreference: the page's Route picker travels with each
// question to the bridge's swarm: the node's default at first, then
// least energy, then fastest, each question answered.
func TestBrowserRoutePreference(t *testing.T) {
	sw, err := wstest.New()
	if err != nil {
		t.Fatal(err)
	}
	url := bridge(t, sw, sw.Peer().String())
	ctx := browser(t)

	do(t, ctx, "loading the page", chromedp.Navigate(url))
	waitJS(t, ctx, "the connection and the model list",
		`document.getElementById('conn').dataset.state === 'open' && document.getElementById('model').value === 'demo'`)
	for i, tc := range []struct {
		option string // "" = left as the page starts
		want   router.EnergyPreference
	}{{"", router.EnergyDefault}, {"energy", router.EnergyPrefer}, {"latency", router.EnergyIgnore}} {
		if tc.option != "" {
			do(t, ctx, "choosing "+tc.option, chromedp.SetValue(chromedp.CSS("#prefer"), tc.option))
		}
		ask(t, ctx, "route by "+tc.option, i+1)
		if got := sw.LastPreference(); got != tc.want {
			t.Errorf("Route %q: the swarm got preference %v, want %v", tc.option, got, tc.want)
		}
	}
}
