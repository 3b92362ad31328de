package bridge

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestWebSocketMount: /ws is mounted behind the API key (header or ?key=)
// and the CORS list, its queries go through the instrumented swarm, and
// its connections show in the metrics.
func TestWebSocketMount(t *testing.T) {
	sw := newLocalSwarm(t)
	_, base := startBridge(t, sw, WithAPIKeys([]string{"wskey"}), WithCORSOrigins([]string{"https://app.example"}))
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws"
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	refused := []struct {
		name   string
		url    string
		header http.Header
		status int
	}{
		{"no key", wsURL, nil, 401},
		{"wrong key", wsURL + "?key=nope", nil, 401},
		{"forbidden origin", wsURL + "?key=wskey", http.Header{"Origin": {"https://evil.example"}}, 403},
	}
	for _, tc := range refused {
		c, resp, err := websocket.Dial(ctx, tc.url, &websocket.DialOptions{HTTPHeader: tc.header})
		if err == nil {
			c.CloseNow()
			t.Errorf("%s: connected", tc.name)
			continue
		}
		if resp == nil || resp.StatusCode != tc.status {
			t.Errorf("%s: %v (response %v), want %d", tc.name, err, resp, tc.status)
		}
	}

	// Bearer header and ?key= both work; an allowed origin too.
	hc, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer wskey"}}})
	if err != nil {
		t.Fatalf("bearer: %v", err)
	}
	defer hc.CloseNow()
	c, _, err := websocket.Dial(ctx, wsURL+"?key=wskey", &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://app.example"}}})
	if err != nil {
		t.Fatalf("?key=: %v", err)
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	read := func(want string) map[string]any {
		t.Helper()
		for {
			_, b, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("waiting for %s: %v", want, err)
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatalf("not JSON: %s", b)
			}
			if m["type"] == want {
				return m
			}
		}
	}
	read("user_info")
	msg := `{"type":"submit_query","query":{"prompt":"over the socket","query_type":"chat","model_type":"worker_node","model_name":"demo"}}`
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	res := read("query_result")
	if r, _ := res["result"].(string); !strings.Contains(r, "You said: over the socket") {
		t.Errorf("query_result %v", res)
	}
	_, m := call(t, "GET", base+"/metrics", "", nil, nil)
	for _, want := range []string{"mtor_bridge_connections 2", `mtor_bridge_queries_total{model="demo",outcome="ok",type="chat"} 1`} {
		if !strings.Contains(string(m), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	c.Close(websocket.StatusNormalClosure, "")
	hc.Close(websocket.StatusNormalClosure, "")
	deadline := time.Now().Add(testTimeout)
	for {
		_, m = call(t, "GET", base+"/metrics", "", nil, nil)
		if strings.Contains(string(m), "mtor_bridge_connections 0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("connections gauge never returned to 0")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestWebUIMounted(t *testing.T) {
	_, base := startBridge(t, newLocalSwarm(t))
	resp, body := call(t, "GET", base+"/", "", nil, nil)
	if resp.StatusCode != 200 || !strings.Contains(strings.ToLower(string(body)), "<html") {
		t.Errorf("GET /: %d %.100s", resp.StatusCode, body)
	}
}
