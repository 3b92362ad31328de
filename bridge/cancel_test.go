package bridge

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/node/worker"
)

// longPrompt makes the slow demo model talk for minutes, so that only a
// cancellation can end the call before the test's timeout.
func longPrompt(marker string) string {
	return marker + " " + strings.Repeat("word ", 5000)
}

// assertCancelled checks that the worker's backend call for marker was
// stopped because the client went away — its context cancelled, or (across
// libp2p) its next write failing on the reset stream — long before the
// minutes it would otherwise run, and that the worker is idle again.
func assertCancelled(t *testing.T, sw *hooks, marker string) {
	t.Helper()
	e := sw.waitEnd(t, marker)
	if e.err == nil || !(errors.Is(e.ctxErr, context.Canceled) || errors.Is(e.err, network.ErrReset)) {
		t.Errorf("backend call ended with err=%v ctx=%v, want it cancelled", e.err, e.ctxErr)
	}
	sw.waitIdle(t)
}

// TestStreamDisconnectCancelsWorker: a client that hangs up on a stream
// cancels the query at the worker, across a real libp2p stream.
func TestStreamDisconnectCancelsWorker(t *testing.T) {
	r, sw, _ := newRealSwarm(t)
	_, base := startBridge(t, r)
	const marker = "DISCONNECT-STREAM"
	body := `{"model":"slow","stream":true,"messages":[{"role":"user","content":"` + longPrompt(marker) + `"}]}`
	req, _ := http.NewRequest("POST", base+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	// Read until the first content delta, then hang up.
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"content":"[demo`) {
			break
		}
	}
	if sc.Err() != nil {
		t.Fatal(sc.Err())
	}
	resp.Body.Close()
	assertCancelled(t, sw, marker)
}

func TestRequestDisconnectCancelsWorker(t *testing.T) {
	r, sw, _ := newRealSwarm(t)
	_, base := startBridge(t, r)
	const marker = "DISCONNECT-PLAIN"
	ctx, cancel := context.WithCancel(context.Background())
	body := `{"model":"slow","messages":[{"role":"user","content":"` + longPrompt(marker) + `"}]}`
	req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	errc := make(chan error, 1)
	go func() {
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	sw.waitStart(t, marker)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("client: %v", err)
	}
	assertCancelled(t, sw, marker)
}

// serveToStop serves a bridge for sw with the given shutdown grace on
// 127.0.0.1:0: stop begins its shutdown, whose end Serve's error on served
// tells.
func serveToStop(t *testing.T, sw Swarm, grace time.Duration) (b *Server, addr string, stop func(), served chan error) {
	t.Helper()
	b, err := New(sw, WithShutdownGrace(grace))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served = make(chan error, 1)
	go func() { served <- b.Serve(ctx, ln) }()
	return b, ln.Addr().String(), stop, served
}

func TestShutdown(t *testing.T) {
	sw := newLocalSwarm(t)
	_, addr, stop, served := serveToStop(t, sw, time.Minute)
	base := "http://" + addr

	// A query in flight when shutdown begins finishes within the grace.
	const marker = "GRACEFUL"
	done := make(chan int, 1)
	go func() {
		resp, err := client.Post(base+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"slow","messages":[{"role":"user","content":"`+marker+` a b c"}]}`))
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	sw.waitStart(t, marker)
	stop()
	if code := <-done; code != http.StatusOK {
		t.Errorf("in-flight query during shutdown: status %d", code)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := client.Get(base + "/healthz"); err == nil {
		t.Errorf("still serving after shutdown")
	}

	// A stream outliving the grace is cancelled at the worker.
	sw2 := newLocalSwarm(t)
	b2, _ := New(sw2, WithShutdownGrace(0))
	ln2, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx2, stop2 := context.WithCancel(context.Background())
	served2 := make(chan error, 1)
	go func() { served2 <- b2.Serve(ctx2, ln2) }()
	const marker2 = "CUT-BY-SHUTDOWN"
	go func() {
		resp, err := client.Post("http://"+ln2.Addr().String()+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"slow","stream":true,"messages":[{"role":"user","content":"`+longPrompt(marker2)+`"}]}`))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	sw2.waitStart(t, marker2)
	stop2()
	if err := <-served2; err == nil {
		t.Errorf("Serve returned nil although a stream was cut")
	}
	assertCancelled(t, sw2.hooks, marker2)
}

// TestDeadlineAndBusy: the bridge's query timeout reaches the worker (504),
// and a worker with no free slot and no queue makes the swarm busy (429
// with Retry-After). The bridge admits two queries at once here, more than
// the worker's one slot, so that the worker's own BUSY is what refuses.
func TestDeadlineAndBusy(t *testing.T) {
	sw := newLocalSwarm(t, worker.WithMaxConcurrency(1), worker.WithMaxQueue(0))
	_, base := startBridge(t, sw, WithQueryTimeout(300*time.Millisecond))
	resp, body := postJSON(t, base+"/v1/chat/completions", `{"model":"slow","messages":[{"role":"user","content":"`+longPrompt("DEADLINE")+`"}]}`, nil)
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("deadline: %d %s", resp.StatusCode, body)
	}
	assertErrorShape(t, body, "timeout")
	if e := sw.waitEnd(t, "DEADLINE"); !errors.Is(e.ctxErr, context.DeadlineExceeded) {
		t.Errorf("worker's backend call ended with ctx %v, want its deadline", e.ctxErr)
	}
	sw.waitIdle(t)

	_, base = startBridge(t, sw, WithRetryAfter(4*time.Second), WithMaxInFlight(2))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", base+"/v1/chat/completions",
		strings.NewReader(`{"model":"slow","messages":[{"role":"user","content":"`+longPrompt("HOLDS-THE-SLOT")+`"}]}`))
	req.Header.Set("Content-Type", "application/json")
	go func() {
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	sw.waitStart(t, "HOLDS-THE-SLOT")
	resp, body = postJSON(t, base+"/v1/chat/completions", `{"model":"demo","messages":[{"role":"user","content":"x"}]}`, nil)
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "4" {
		t.Errorf("busy: %d Retry-After %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	assertErrorShape(t, body, "swarm_busy")
	cancel()
	assertCancelled(t, sw.hooks, "HOLDS-THE-SLOT")
}

// wsToStop serves a bridge for a new local swarm with the given grace
// (serveToStop) and dials its /ws; ctx bounds the test's reads and writes.
func wsToStop(t *testing.T, grace time.Duration) (sw *localSwarm, b *Server, ctx context.Context, c *websocket.Conn, stop func(), served chan error) {
	t.Helper()
	sw = newLocalSwarm(t)
	b, addr, stop, served := serveToStop(t, sw, grace)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	c, _, err := websocket.Dial(ctx, "ws://"+addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return sw, b, ctx, c, stop, served
}

// wsSubmit sends a chat query for the slow model on c.
func wsSubmit(t *testing.T, ctx context.Context, c *websocket.Conn, id, prompt string) {
	t.Helper()
	q, _ := json.Marshal(map[string]any{"type": "submit_query", "query_id": id, "query": map[string]any{"prompt": prompt, "query_type": "chat", "model_name": "slow"}})
	if err := c.Write(ctx, websocket.MessageText, q); err != nil {
		t.Fatal(err)
	}
}

// TestShutdownGivesWebSocketQueriesTheGrace: a WebSocket query in flight
// when the bridge begins to stop gets the grace, as an HTTP one does,
// though http.Server.Shutdown does not track hijacked connections; a
// query sent meanwhile is refused as UNAVAILABLE, to try elsewhere.
func TestShutdownGivesWebSocketQueriesTheGrace(t *testing.T) {
	sw, b, dctx, c, stop, served := wsToStop(t, time.Minute)
	submit := func(id, prompt string) { wsSubmit(t, dctx, c, id, prompt) }
	const marker = "WS-GRACEFUL"
	submit("q1", marker+" a b c")
	sw.waitStart(t, marker)
	stop()
	for b.ws.Connections() > 0 && !b.ws.Draining() {
		time.Sleep(time.Millisecond)
	}
	submit("q2", "too late")
	got := map[string]string{} // query id: what ended it
	for got["q1"] == "" || got["q2"] == "" {
		_, data, err := c.Read(dctx)
		if err != nil {
			t.Fatalf("the connection ended before both answers (%v): %v", got, err)
		}
		var m map[string]any
		_ = json.Unmarshal(data, &m)
		id, _ := m["query_id"].(string)
		switch m["type"] {
		case "query_result":
			got[id] = "result"
		case "error":
			got[id], _ = m["code"].(string)
		}
	}
	if got["q1"] != "result" || got["q2"] != "UNAVAILABLE" {
		t.Fatalf("got %v: want q1 answered within the grace and q2 refused as UNAVAILABLE", got)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
}

// TestWebSocketQueriesPastTheGraceEndWithAnError: when the grace runs
// out, each WebSocket query still running is cancelled at its worker and
// ends with its own UNAVAILABLE error, written before the connection
// closes with 1001: a client with several queries on one connection
// learns which went unanswered.
func TestWebSocketQueriesPastTheGraceEndWithAnError(t *testing.T) {
	sw, _, dctx, c, stop, served := wsToStop(t, 0)
	markers := map[string]string{"q1": "WS-CUT-ONE", "q2": "WS-CUT-TWO"}
	for id, marker := range markers {
		wsSubmit(t, dctx, c, id, longPrompt(marker))
	}
	sw.waitStart(t, markers["q1"], markers["q2"])
	stop()
	got := map[string]string{} // query id: the error code that ended it
	var closeErr error
	for closeErr == nil {
		_, data, err := c.Read(dctx)
		if err != nil {
			closeErr = err
			break
		}
		var m map[string]any
		_ = json.Unmarshal(data, &m)
		id, _ := m["query_id"].(string)
		switch m["type"] {
		case "query_result":
			t.Errorf("query %s answered, want it cut by the shutdown", id)
		case "error":
			got[id], _ = m["code"].(string)
		}
	}
	if got["q1"] != "UNAVAILABLE" || got["q2"] != "UNAVAILABLE" || len(got) != 2 {
		t.Errorf("errors before the close %v, want UNAVAILABLE for q1 and q2", got)
	}
	if st := websocket.CloseStatus(closeErr); st != websocket.StatusGoingAway {
		t.Errorf("the connection ended with %v, want a close with 1001 (going away)", closeErr)
	}
	<-served
	for _, marker := range markers {
		assertCancelled(t, sw.hooks, marker)
	}
}

// TestRequestsPastTheGraceEndWithAnError: when the grace runs out, an
// HTTP query still running is cancelled at its worker and its client,
// still there, reads why, in its API's shape: 503 with Retry-After
// before the answer began, an error event (OpenAI) or line (Ollama)
// ending a stream already under way. Before, the first ended with the
// connection closed and no status, the second with no error at all.
func TestRequestsPastTheGraceEndWithAnError(t *testing.T) {
	openAIError := func(t *testing.T, b []byte) { assertErrorShape(t, b, "bridge_stopping") }
	ollamaError := func(t *testing.T, b []byte) {
		var e map[string]any
		if err := json.Unmarshal(b, &e); err != nil || len(e) != 1 || !strings.Contains(fmt.Sprint(e["error"]), "bridge stopped") {
			t.Errorf("error %s (%v), want Ollama's {\"error\": ...} saying the bridge stopped", b, err)
		}
	}
	cases := []struct {
		name   string
		path   string
		stream bool
		line   func(string) (string, bool) // a stream's event in a line
		check  func(*testing.T, []byte)
	}{
		{name: "openai whole answer", path: "/v1/chat/completions", check: openAIError},
		{name: "openai stream under way", path: "/v1/chat/completions", stream: true, check: openAIError,
			line: func(l string) (string, bool) { return strings.CutPrefix(l, "data: ") }},
		{name: "ollama whole answer", path: "/api/chat", check: ollamaError},
		{name: "ollama stream under way", path: "/api/chat", stream: true, check: ollamaError,
			line: func(l string) (string, bool) { return l, strings.HasPrefix(l, "{") }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sw := newLocalSwarm(t)
			_, addr, stop, served := serveToStop(t, sw, 0)
			marker := "HTTP-CUT-" + strings.ReplaceAll(tc.name, " ", "-")
			body := fmt.Sprintf(`{"model":"slow","stream":%v,"messages":[{"role":"user","content":"%s"}]}`, tc.stream, longPrompt(marker))
			if tc.stream {
				// Headers and the first tokens arrive before the stop.
				resp, err := client.Post("http://"+addr+tc.path, "application/json", strings.NewReader(body))
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				rd := bufio.NewReader(resp.Body)
				line, err := rd.ReadString('\n')
				if _, ok := tc.line(line); err != nil || !ok {
					t.Fatalf("first line %q, %v: want a chunk", line, err)
				}
				stop()
				rest, _ := io.ReadAll(rd)
				var last string
				for l := range strings.Lines(string(rest)) {
					if ev, ok := tc.line(l); ok {
						last = strings.TrimSpace(ev)
					}
				}
				tc.check(t, []byte(last))
			} else {
				// The request waits for the whole answer: stop once the
				// worker began it.
				type reply struct {
					resp *http.Response
					err  error
				}
				got := make(chan reply, 1)
				go func() {
					r, err := client.Post("http://"+addr+tc.path, "application/json", strings.NewReader(body))
					got <- reply{r, err}
				}()
				sw.waitStart(t, marker)
				stop()
				r := <-got
				if r.err != nil {
					t.Fatalf("the client read no answer: %v", r.err)
				}
				defer r.resp.Body.Close()
				b, _ := io.ReadAll(r.resp.Body)
				if r.resp.StatusCode != http.StatusServiceUnavailable || r.resp.Header.Get("Retry-After") == "" {
					t.Errorf("status %d, Retry-After %q: want 503 with a retry hint", r.resp.StatusCode, r.resp.Header.Get("Retry-After"))
				}
				tc.check(t, b)
			}
			<-served
			assertCancelled(t, sw.hooks, marker)
		})
	}
}
