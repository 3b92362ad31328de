package ws_test

import (
	"net/http"
	"testing"

	"github.com/mtor-swarm/mtor/bridge/ws"
)

// TestTrustForwardedHost: a page whose Origin is the X-Forwarded-Host opens
// /ws only with WithTrustForwardedHost; the request's own host always may,
// a foreign origin never.
func TestTrustForwardedHost(t *testing.T) {
	tests := []struct {
		name      string
		trust     bool
		origin    string // "" = the harness's own http://127.0.0.1:port
		forwarded string
		ok        bool
	}{
		{"own host", false, "", "", true},
		{"forwarded, untrusted", false, "https://app.example", "app.example", false},
		{"forwarded, trusted", true, "https://app.example", "app.example", true},
		{"forwarded list, trusted", true, "https://app.example", "app.example, proxy.internal", true},
		{"foreign, trusted", true, "https://evil.example", "app.example", false},
		{"no header, trusted", true, "https://app.example", "", false},
		{"own host, trusted", true, "", "app.example", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil, ws.WithTrustForwardedHost(tt.trust))
			origin := tt.origin
			if origin == "" {
				origin = h.http.URL
			}
			hdr := http.Header{"Origin": {origin}}
			if tt.forwarded != "" {
				hdr.Set("X-Forwarded-Host", tt.forwarded)
			}
			c, resp, err := h.dial(hdr, "")
			if !tt.ok {
				if err == nil {
					t.Fatalf("connected, want 403")
				}
				if resp == nil || resp.StatusCode != http.StatusForbidden {
					t.Fatalf("%v (response %v), want 403", err, resp)
				}
				return
			}
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			if cookie, _, _ := c.hello(); cookie.str("value") == "" {
				t.Errorf("set_cookie %v", cookie)
			}
		})
	}
}
