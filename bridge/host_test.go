package bridge

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

// hostCall sends method path to base with Host and Origin set to host (the
// way a browser on a DNS rebinding page sends them: both its own name),
// plus header, and returns the status and the error code of the body.
func hostCall(t *testing.T, base, method, path, host string, header map[string]string) (int, string) {
	t.Helper()
	var body *strings.Reader
	if method == http.MethodPost {
		body = strings.NewReader(`{"model":"demo","messages":[{"role":"user","content":"hi"}]}`)
	} else {
		body = strings.NewReader("")
	}
	req, err := http.NewRequest(method, base+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Host = host
	req.Header.Set("Origin", "http://"+host)
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s (Host %s): %v", method, path, host, err)
	}
	defer resp.Body.Close()
	var eb errorBody
	_ = json.NewDecoder(resp.Body).Decode(&eb)
	code := ""
	if eb.Error.Code != nil {
		code = *eb.Error.Code
	}
	return resp.StatusCode, code
}

// hostDial opens /ws with Host and Origin set to host and returns the
// handshake's status (101 when it connected).
func hostDial(t *testing.T, base, host string, header http.Header) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	h := http.Header{"Origin": {"http://" + host}}
	for k, v := range header {
		h[k] = v
	}
	c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws", &websocket.DialOptions{Host: host, HTTPHeader: h})
	if err == nil {
		c.CloseNow()
		return http.StatusSwitchingProtocols
	}
	if resp == nil {
		t.Fatalf("/ws (Host %s): %v", host, err)
	}
	return resp.StatusCode
}

// TestHostGuard: a keyless bridge answers only to its own names. A DNS
// rebinding page (Host and Origin its own name, pointed at 127.0.0.1) is
// refused with 403 host_not_allowed on every route but /healthz; loopback
// names, the connection's own address and WithAllowedHosts (--bridge-host)
// names are served. With API keys the Host is not checked: the keys
// protect the API whatever the name.
func TestHostGuard(t *testing.T) {
	sw := newLocalSwarm(t)
	_, open := startBridge(t, sw, WithAllowedHosts("bridge.example"))
	_, keyed := startBridge(t, sw, WithAPIKeys([]string{"k"}))
	_, proxied := startBridge(t, sw, WithTrustForwardedHost(true), WithAllowedHosts("public.example"))
	port := func(base string) string { u, _ := url.Parse(base); return u.Port() }
	bearer := map[string]string{"Authorization": "Bearer k"}

	routes := []struct{ method, path string }{
		{http.MethodPost, "/v1/chat/completions"},
		{http.MethodGet, "/v1/models"},
		{http.MethodGet, "/api/swarm"},
		{http.MethodGet, "/"},
		{http.MethodGet, "/metrics"},
	}
	tests := []struct {
		name   string
		base   string
		host   string // Host and Origin
		header map[string]string
		want   bool
	}{
		{"rebinding name", open, "evil.example:" + port(open), nil, false},
		{"rebinding name, no port", open, "evil.example", nil, false},
		{"name that ends like an allowed one", open, "evil-bridge.example:" + port(open), nil, false},
		{"127.0.0.1", open, "127.0.0.1:" + port(open), nil, true},
		{"localhost", open, "localhost:" + port(open), nil, true},
		{"::1", open, "[::1]:" + port(open), nil, true},
		{"--bridge-host name", open, "bridge.example:" + port(open), nil, true},
		{"--bridge-host name, other port", open, "Bridge.Example", nil, true},
		{"keys on: any name", keyed, "evil.example:" + port(keyed), bearer, true},
		{"trusted proxy, forwarded host allowed", proxied, "127.0.0.1:" + port(proxied), map[string]string{"X-Forwarded-Host": "public.example"}, true},
		{"trusted proxy, forwarded host foreign", proxied, "127.0.0.1:" + port(proxied), map[string]string{"X-Forwarded-Host": "evil.example"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, rt := range routes {
				status, code := hostCall(t, tc.base, rt.method, rt.path, tc.host, tc.header)
				if tc.want && status != http.StatusOK {
					t.Errorf("%s %s: %d %s, want 200", rt.method, rt.path, status, code)
				}
				if !tc.want && (status != http.StatusForbidden || code != "host_not_allowed") {
					t.Errorf("%s %s: %d %q, want 403 host_not_allowed", rt.method, rt.path, status, code)
				}
			}
			h := http.Header{}
			for k, v := range tc.header {
				h.Set(k, v)
			}
			status := hostDial(t, tc.base, tc.host, h)
			want := http.StatusSwitchingProtocols
			if !tc.want {
				want = http.StatusForbidden
			}
			if status != want {
				t.Errorf("/ws: %d, want %d", status, want)
			}
			// /healthz tells nothing and answers whatever the name.
			if status, code := hostCall(t, tc.base, http.MethodGet, "/healthz", tc.host, tc.header); status != http.StatusOK {
				t.Errorf("/healthz: %d %s, want 200", status, code)
			}
		})
	}
}

// TestHostGuardAllowsAnyWithStar: --bridge-host '*' turns the check off.
func TestHostGuardAllowsAnyWithStar(t *testing.T) {
	_, base := startBridge(t, newLocalSwarm(t), WithAllowedHosts("*"))
	if status, code := hostCall(t, base, http.MethodGet, "/api/swarm", "evil.example", nil); status != http.StatusOK {
		t.Fatalf("/api/swarm: %d %s, want 200", status, code)
	}
}

func TestWithAllowedHostsRefusesURLs(t *testing.T) {
	if _, err := New(&fakeSwarm{}, WithAllowedHosts("http://bridge.example")); err == nil {
		t.Fatal("New accepted a URL as a host name")
	}
}
