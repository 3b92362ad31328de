package bridge

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

// startProxy puts a real reverse proxy on 127.0.0.1 in front of base that
// rewrites Host to the bridge's and sets X-Forwarded-Host to the host the
// client used, as nginx or Caddy in front of a bridge do. It returns the
// proxy's URL: the origin of the bridge's page as the browser sees it.
func startProxy(t *testing.T, base string) string {
	t.Helper()
	target, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	rp := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target) // Host becomes the bridge's 127.0.0.1:port
		pr.SetXForwarded()
	}}
	ps := httptest.NewServer(rp)
	t.Cleanup(ps.Close)
	return ps.URL
}

// TestTrustForwardedHost: behind a proxy that rewrites Host, the bridge's
// own page (its Origin the proxy's host) is refused by default and allowed
// with WithTrustForwardedHost, on the API and on /ws; a foreign origin is
// refused either way.
func TestTrustForwardedHost(t *testing.T) {
	for _, trust := range []bool{false, true} {
		name := map[bool]string{false: "default", true: "trusted"}[trust]
		t.Run(name, func(t *testing.T) {
			_, base := startBridge(t, newLocalSwarm(t), WithTrustForwardedHost(trust))
			front := startProxy(t, base)
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()

			tests := []struct {
				origin string
				want   bool
			}{
				{front, trust},                  // the bridge's own page, through the proxy
				{"https://evil.example", false}, // never
			}
			for _, tc := range tests {
				status := http.StatusForbidden
				if tc.want {
					status = http.StatusOK
				}
				for _, path := range []string{"/v1/models", "/api/swarm"} {
					resp, b := call(t, "GET", front+path, "", nil, map[string]string{"Origin": tc.origin})
					if resp.StatusCode != status {
						t.Errorf("GET %s from %s: %d %s, want %d", path, tc.origin, resp.StatusCode, b, status)
					}
				}

				c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(front, "http")+"/ws",
					&websocket.DialOptions{HTTPHeader: http.Header{"Origin": {tc.origin}}})
				if !tc.want {
					if err == nil {
						c.CloseNow()
						t.Errorf("/ws from %s: connected, want 403", tc.origin)
					} else if resp == nil || resp.StatusCode != http.StatusForbidden {
						t.Errorf("/ws from %s: %v (response %v), want 403", tc.origin, err, resp)
					}
					continue
				}
				if err != nil {
					t.Fatalf("/ws from %s: %v", tc.origin, err)
				}
				// The connection works through the proxy: the first message arrives.
				_, b, err := c.Read(ctx)
				c.CloseNow()
				if err != nil || !strings.Contains(string(b), `"set_cookie"`) {
					t.Errorf("/ws from %s: first message %s, %v", tc.origin, b, err)
				}
			}
		})
	}
}
