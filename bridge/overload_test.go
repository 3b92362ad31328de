package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// overloadSwarm is two real demo workers on loopback (4 slots each, 5 ms
// between tokens: ~40 ms a query) behind a client node whose router is the
// bridge's swarm.
func overloadSwarm(t *testing.T) *router.Router {
	t.Helper()
	// A heartbeat of 2 s (peer table TTL 4-6 s) instead of swarmtest's
	// 200 ms: under this load on 2 cores (or with -race) announcements
	// can lag long enough for workers to expire from the table.
	sw := swarmtest.New(t, swarmtest.Workers(2), swarmtest.Clients(1), swarmtest.DemoDelay(5*time.Millisecond),
		swarmtest.NodeOptions(node.WithAnnounceInterval(2*time.Second)))
	r := sw.Clients[0].Router()
	deadline := time.Now().Add(testTimeout)
	for capacityOf(r.Peers()) != 8 {
		if time.Now().After(deadline) {
			t.Fatalf("client node sees capacity %d, want 8 (2 workers × 4)", capacityOf(r.Peers()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	return r
}

// healthProbe asks /healthz every 20 ms until stopped and keeps the
// slowest answer: the bridge must stay observable under overload.
type healthProbe struct {
	began   time.Time
	worst   atomic.Int64 // ns
	worstAt atomic.Int64 // ns after began
	failed  atomic.Int64
	n       atomic.Int64
	stop    func()
}

func probeHealth(base string) *healthProbe {
	p := &healthProbe{began: time.Now()}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	go func() {
		defer close(done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			start := time.Now()
			resp, err := hc.Get(base + "/healthz")
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			d := time.Since(start)
			p.n.Add(1)
			if err != nil || resp.StatusCode != 200 {
				p.failed.Add(1)
			}
			if int64(d) > p.worst.Load() { // one prober: no race on the pair
				p.worst.Store(int64(d))
				p.worstAt.Store(int64(start.Sub(p.began)))
			}
		}
	}()
	p.stop = func() { cancel(); <-done }
	return p
}

func (p *healthProbe) report(t *testing.T, phase string) {
	t.Helper()
	p.stop()
	worst := time.Duration(p.worst.Load())
	t.Logf("%s: /healthz asked %d times, slowest %s (asked %s after the load began), %d failed", phase, p.n.Load(),
		worst.Round(100*time.Microsecond), time.Duration(p.worstAt.Load()).Round(time.Millisecond), p.failed.Load())
	// The goal is < 50 ms, measured and logged (docs/benchmarks.md); the
	// bound only catches a bridge that stops answering, even under -race.
	if p.failed.Load() > 0 || worst > 5*time.Second {
		t.Errorf("%s: /healthz slowest %s, %d failed", phase, worst, p.failed.Load())
	}
}

// wsOutcome is how one WebSocket client's query ended.
type wsOutcome struct {
	code       string // "" when answered
	retryAfter float64
	bridgeQ    int // queue_update messages with queue "bridge"
	err        error
}

// wsQuery connects, calls dialed, waits for start, sends one chat query
// and reads until it ends.
func wsQuery(ctx context.Context, url, prompt string, dialed func(), start <-chan struct{}) wsOutcome {
	c, _, err := websocket.Dial(ctx, url, nil)
	dialed()
	if err != nil {
		return wsOutcome{err: fmt.Errorf("dial: %w", err)}
	}
	defer c.CloseNow()
	<-start
	b, _ := json.Marshal(map[string]any{"type": "submit_query", "query": map[string]any{"prompt": prompt, "query_type": "chat", "model_name": "demo"}})
	if err := c.Write(ctx, websocket.MessageText, b); err != nil {
		return wsOutcome{err: fmt.Errorf("write: %w", err)}
	}
	var out wsOutcome
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			out.err = fmt.Errorf("read: %w", err)
			return out
		}
		var m struct {
			Type       string  `json:"type"`
			Code       string  `json:"code"`
			Queue      string  `json:"queue"`
			RetryAfter float64 `json:"retry_after"`
			Message    string  `json:"message"`
		}
		if err := json.Unmarshal(data, &m); err != nil {
			out.err = err
			return out
		}
		switch m.Type {
		case "queue_update":
			if m.Queue == "bridge" {
				out.bridgeQ++
			}
		case "query_done":
			c.Close(websocket.StatusNormalClosure, "")
			return out
		case "error":
			out.code, out.retryAfter = m.Code, m.RetryAfter
			if m.Code != "BUSY" {
				out.err = fmt.Errorf("error %s: %s", m.Code, m.Message)
			}
			c.Close(websocket.StatusNormalClosure, "")
			return out
		}
	}
}

// TestOverload: far more queries than the swarm's 8 slots, over the
// WebSocket and HTTP. None ends in a backend error; each is answered or
// refused busy with a retry hint; waiting ones hear their place; one
// client's burst does not hold back another's query; /healthz stays quick.
func TestOverload(t *testing.T) {
	if testing.Short() {
		t.Skip("overload test: -short")
	}
	r := overloadSwarm(t)
	b, base := startBridge(t, r, WithQueuePerClient(256), WithQueueUpdates(200*time.Millisecond))
	wsURL := "ws" + strings.TrimPrefix(base, "http") + "/ws?format=text"

	t.Run("2000 websocket clients", func(t *testing.T) {
		const clients = 2000
		ctx, cancel := context.WithTimeout(context.Background(), 3*testTimeout)
		defer cancel()
		start := make(chan struct{})
		outs := make([]wsOutcome, clients)
		var wg sync.WaitGroup
		dials := make(chan struct{}, 64) // dial 64 at a time: the listen backlog is finite
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				dials <- struct{}{}
				outs[i] = wsQuery(ctx, wsURL, fmt.Sprintf("client %d", i), func() { <-dials }, start)
			}()
		}
		deadline := time.Now().Add(testTimeout)
		for b.ws.Connections() < clients && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("%d WebSocket connections open", b.ws.Connections())
		probe := probeHealth(base)
		began := time.Now()
		close(start)
		wg.Wait()
		probe.report(t, "2000 websocket clients")
		answered, busy, waited := 0, 0, 0
		codes := map[string]int{}
		for i, o := range outs {
			switch {
			case o.err != nil:
				codes[o.code]++
				if len(codes) < 5 {
					t.Errorf("client %d: %v", i, o.err)
				}
			case o.code == "":
				answered++
			case o.code == "BUSY":
				busy++
				if o.retryAfter < 1 {
					t.Errorf("client %d: BUSY without a retry hint", i)
				}
			}
			if o.bridgeQ > 0 {
				waited++
			}
		}
		st := b.queue.Stats()
		t.Logf("%d answered, %d busy (with retry_after), %d heard queue_update from the bridge queue, other errors %v; %s; queue: most waiting %d, limit %d",
			answered, busy, waited, codes, time.Since(began).Round(time.Millisecond), st.MaxWaiting, st.Limit)
		if answered+busy != clients {
			t.Errorf("%d answered + %d busy != %d clients", answered, busy, clients)
		}
		if answered < DefaultQueue/2 || waited == 0 {
			t.Errorf("only %d answered, %d waited: the queue did not hold the burst", answered, waited)
		}
	})

	t.Run("http flood", func(t *testing.T) {
		const requests = 600
		probe := probeHealth(base)
		hc := &http.Client{Timeout: 3 * testTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: requests}}
		statuses := make([]int, requests)
		retry := make([]string, requests)
		codes := make([]string, requests)
		var wg sync.WaitGroup
		for i := range requests {
			wg.Add(1)
			go func() {
				defer wg.Done()
				body := fmt.Sprintf(`{"model":"demo","messages":[{"role":"user","content":"flood %d"}]}`, i)
				req, _ := http.NewRequest("POST", base+"/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				resp, err := hc.Do(req)
				if err != nil {
					statuses[i] = -1
					codes[i] = err.Error()
					return
				}
				defer resp.Body.Close()
				statuses[i], retry[i] = resp.StatusCode, resp.Header.Get("Retry-After")
				if resp.StatusCode != 200 {
					var e errorBody
					_ = json.NewDecoder(resp.Body).Decode(&e)
					if e.Error.Code != nil {
						codes[i] = *e.Error.Code
					}
				} else {
					_, _ = io.Copy(io.Discard, resp.Body)
				}
			}()
		}
		wg.Wait()
		probe.report(t, "http flood")
		count := map[int]int{}
		for i, s := range statuses {
			count[s]++
			if s == 200 {
				continue
			}
			if n, _ := strconv.Atoi(retry[i]); s != http.StatusTooManyRequests || n < 1 || codes[i] != "swarm_busy" {
				if count[s] < 3 {
					t.Errorf("request %d: %d %q Retry-After %q, want 200 or 429 swarm_busy with Retry-After", i, s, codes[i], retry[i])
				}
			}
		}
		t.Logf("%d requests from one client: %v (status: count)", requests, count)
		if count[200] == 0 || count[http.StatusTooManyRequests] == 0 {
			t.Errorf("want some answered and some refused: %v", count)
		}
	})

	t.Run("a burst does not hold back another client", func(t *testing.T) {
		const burst = 200
		var done atomic.Int64
		var wg sync.WaitGroup
		hc := &http.Client{Timeout: 3 * testTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: burst}}
		for i := range burst {
			wg.Add(1)
			go func() {
				defer wg.Done()
				body := fmt.Sprintf(`{"model":"demo","messages":[{"role":"user","content":"burst %d"}]}`, i)
				resp, err := hc.Post(base+"/v1/chat/completions", "application/json", strings.NewReader(body))
				if err != nil {
					t.Error(err)
					return
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Errorf("burst query %d: %d", i, resp.StatusCode)
				}
				done.Add(1)
			}()
		}
		deadline := time.Now().Add(testTimeout)
		for b.queue.Stats().Waiting < burst/2 && time.Now().Before(deadline) {
			time.Sleep(2 * time.Millisecond)
		}
		// Another client (a WebSocket user) asks once.
		before := done.Load()
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		start := make(chan struct{})
		close(start)
		o := wsQuery(ctx, wsURL, "just one", func() {}, start)
		after := done.Load()
		wg.Wait()
		t.Logf("burst of %d from one client: %d of its queries were answered while the other client's one query waited (%d open when it asked)", burst, after-before, burst-int(before))
		if o.err != nil || o.code != "" {
			t.Fatalf("single query: %+v", o)
		}
		// Round robin admits it within a round: about one slot's worth of
		// the burst (8 running) may end first, never the whole burst.
		if after-before > 40 {
			t.Errorf("%d burst queries were answered before the other client's one query", after-before)
		}
	})
}
