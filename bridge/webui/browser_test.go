package webui_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/mtor-swarm/mtor/bridge/webui"
	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/swarmtest"
)

const chromiumPath = "/usr/bin/chromium"

// browser starts headless Chromium with a fresh profile, or skips the test
// when there is no Chromium and this is not CI.
func browser(t *testing.T) context.Context {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("skipping browser test: %s not found (install Debian's chromium; CI never skips)", chromiumPath)
		}
		t.Fatalf("CI is set but %s is missing: %v", chromiumPath, err)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 900),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(actx)
	ctx, cancelTimeout := context.WithTimeout(ctx, 4*time.Minute)
	t.Cleanup(func() {
		cancelTimeout()
		cancelCtx()
		cancelAlloc()
	})
	// Any uncaught exception or console.error in the page fails the test.
	var mu sync.Mutex
	var jsErrors []string
	if err := chromedp.Listen(ctx, func(ev any) {
		var msg string
		switch e := ev.(type) {
		case *runtime.EventExceptionThrown:
			msg = e.ExceptionDetails.Text
			if ex := e.ExceptionDetails.Exception; ex != nil && ex.Description != "" {
				msg += " " + ex.Description
			}
		case *runtime.EventConsoleAPICalled:
			if e.Type == runtime.ConsoleAPICalledTypeError {
				msg = "console.error"
			}
		}
		if msg != "" {
			mu.Lock()
			jsErrors = append(jsErrors, msg)
			mu.Unlock()
		}
	}); err != nil {
		t.Fatalf("listening to the page: %v", err)
	}
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		if len(jsErrors) > 0 {
			t.Errorf("JavaScript errors in the page: %q", jsErrors)
		}
	})
	return ctx
}

// bridge serves the page, /ws and a minimal /api/swarm (in the shape the
// bridge produces) on one loopback server.
func bridge(t *testing.T, sw ws.Swarm, self string) string {
	t.Helper()
	wss := ws.New(sw)
	mux := http.NewServeMux()
	mux.Handle("/ws", wss)
	mux.HandleFunc("/api/swarm", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"peers": sw.Peers(), "models": sw.Models(), "self": self})
	})
	mux.Handle("/", webui.Handler())
	hs := httptest.NewServer(mux)
	t.Cleanup(func() {
		wss.Close()
		hs.Close()
	})
	return hs.URL
}

func run[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

func do(t *testing.T, ctx context.Context, what string, as ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	if err := chromedp.Do(ctx, as...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func waitJS(t *testing.T, ctx context.Context, what, expr string) {
	t.Helper()
	run(t, ctx, "waiting for "+what, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(2*time.Minute), chromedp.WithPollingInterval(50*time.Millisecond)))
}

// ask types a question and sends it, then waits until the n-th answer
// (1-based, counting every answer on the page) has ended.
func ask(t *testing.T, ctx context.Context, prompt string, n int) {
	t.Helper()
	do(t, ctx, "typing", chromedp.SendKeys(chromedp.CSS("#prompt"), prompt), chromedp.Click(chromedp.CSS("#send")))
	waitJS(t, ctx, fmt.Sprintf("answer %d", n),
		fmt.Sprintf(`document.querySelectorAll('.msg.assistant').length >= %d &&
			!document.querySelector('.msg.assistant[data-state="waiting"], .msg.assistant[data-state="streaming"]')`, n))
}

// On the swarm's two transports: the bridge reaches the worker over TCP,
// or over QUIC as two default nodes do.
func TestBrowserChatStreamsShowsSwarmAndRendersAnswersAsText(t *testing.T) {
	for _, tc := range []struct {
		name, transport string
		opts            []swarmtest.Option
	}{
		{"tcp", "tcp", nil},
		{"quic", "quic-v1", []swarmtest.Option{swarmtest.QUIC()}},
	} {
		t.Run(tc.name, func(t *testing.T) { testBrowserChatStreams(t, tc.transport, tc.opts...) })
	}
}

func testBrowserChatStreams(t *testing.T, transport string, opts ...swarmtest.Option) {
	// A real swarm on loopback: the page's bridge runs on a node without
	// backends, the answers come over libp2p from a demo worker whose
	// words are 40 ms apart, so that streaming is visible.
	var running, stopped atomic.Int64
	sw := swarmtest.New(t, append([]swarmtest.Option{swarmtest.Workers(1), swarmtest.Clients(1),
		swarmtest.Backends(func(_ int, label string) []backend.Backend {
			return []backend.Backend{wstest.Observed{Backend: demo.New(label, demo.WithDelay(40*time.Millisecond)), Running: &running, Stopped: &stopped}}
		})}, opts...)...)
	worker := sw.Workers[0].ID()
	client := sw.Clients[0]
	url := bridge(t, client.Router(), client.ID().String())
	ctx := browser(t)

	do(t, ctx, "loading the page", chromedp.Navigate(url))
	waitJS(t, ctx, "the connection and the model list",
		`document.getElementById('conn').dataset.state === 'open' && document.getElementById('model').value === 'demo'`)

	// Count what the answer bubble shows while it streams.
	do(t, ctx, "installing the observer", chromedp.Evaluate[chromedp.Void](`
		window.__seen = [];
		new MutationObserver(() => {
			const b = document.querySelector('.msg.assistant[data-state="streaming"] .bubble');
			if (b) window.__seen.push(b.textContent);
		}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});`))
	question := "tell me how a swarm of many small machines answers one question"
	ask(t, ctx, question, 1)

	seen := run(t, ctx, "reading the observed texts", chromedp.Evaluate[[]string](`window.__seen`))
	distinct := slices.Compact(slices.Clone(seen))
	final := run(t, ctx, "reading the answer", chromedp.Evaluate[string](`document.querySelector('.msg.assistant .bubble').textContent`))
	if !strings.Contains(final, "You said: "+question) {
		t.Fatalf("answer %q does not echo the question", final)
	}
	partial := 0
	for _, s := range distinct {
		if s != "" && len(s) < len(final) && strings.HasPrefix(final, s) {
			partial++
		}
	}
	if partial < 3 {
		t.Errorf("saw %d partial answers before completion (%q), want the answer to stream", partial, distinct)
	}
	meta := run(t, ctx, "reading the answer's meta", chromedp.Evaluate[string](`document.querySelector('.msg.assistant .meta').textContent`))
	short := worker.String()
	short = short[len(short)-8:]
	for _, want := range []string{short, "tok/s", "first token"} {
		if !strings.Contains(meta, want) {
			t.Errorf("answer meta %q does not show %q", meta, want)
		}
	}

	// The swarm view shows the peer with its model, and who answered.
	waitJS(t, ctx, "the peer in the swarm view", fmt.Sprintf(`(() => {
		const row = document.querySelector('#peers tbody tr[data-peer=%q]');
		return row && row.textContent.includes(%q) && row.textContent.includes('demo');
	})()`, worker.String(), short))
	// It says how the worker is reached (loopback only here: "LAN only")
	// and how the bridge is connected to it: the bridge queried it, so
	// directly, over the swarm's transport.
	reach := run(t, ctx, "reading the reach cell", chromedp.Evaluate[string](fmt.Sprintf(`(() => {
		const c = document.querySelector('#peers tbody tr[data-peer=%q] td.reach');
		return c ? c.dataset.reachability + "|" + c.dataset.path + "|" + c.textContent : "";
	})()`, worker.String())))
	if want := "private|direct|LAN onlydirect (" + transport + ")"; reach != want {
		t.Errorf("reach cell %q, want %s", reach, want)
	}
	answers := run(t, ctx, "reading the answers list", chromedp.Evaluate[string](`document.getElementById('answers').textContent`))
	if !strings.Contains(answers, short) || !strings.Contains(answers, question[:20]) {
		t.Errorf("answers list %q does not say who answered", answers)
	}

	// A model reply with HTML in it is shown as text and runs nothing.
	const evil = `<img src=x onerror="window.__xss=1"><b>bold?</b>`
	do(t, ctx, "arming the trap", chromedp.Evaluate[chromedp.Void](`window.__xss = 0`))
	ask(t, ctx, evil, 2)
	got := run(t, ctx, "checking the rendering", chromedp.Evaluate[map[string]any](`(() => {
		const bubbles = document.querySelectorAll('.msg.assistant .bubble');
		const last = bubbles[bubbles.length - 1];
		return {
			imgs: document.querySelectorAll('img').length,
			bolds: document.querySelectorAll('#messages b').length,
			text: last.textContent,
			visible: last.offsetHeight > 0 && document.body.innerText.includes('onerror='),
			xss: window.__xss,
		};
	})()`))
	if got["imgs"] != float64(0) || got["bolds"] != float64(0) {
		t.Errorf("the reply created elements: %v", got)
	}
	if !strings.Contains(got["text"].(string), "You said: "+evil) || got["visible"] != true {
		t.Errorf("the reply is not shown as literal text: %v", got)
	}
	if got["xss"] != float64(0) {
		t.Errorf("the reply's script ran")
	}

	// Stop cancels the query at the worker.
	do(t, ctx, "asking a long question",
		chromedp.SendKeys(chromedp.CSS("#prompt"), strings.Repeat("again ", 300)), chromedp.Click(chromedp.CSS("#send")))
	waitJS(t, ctx, "streaming", `document.querySelector('.msg.assistant[data-state="streaming"]') !== null`)
	do(t, ctx, "pressing stop", chromedp.Click(chromedp.CSS("#stop")))
	waitJS(t, ctx, "the stopped answer", `(() => {
		const b = document.querySelectorAll('.msg.assistant .bubble');
		return b[b.length - 1].textContent.endsWith('[stopped]');
	})()`)
	deadline := time.Now().Add(time.Minute)
	for (stopped.Load() != 1 || running.Load() != 0) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if stopped.Load() != 1 || running.Load() != 0 {
		t.Errorf("worker backend: %d calls cut short (want 1), %d running", stopped.Load(), running.Load())
	}

	// Media answers are shown and playable.
	do(t, ctx, "choosing imagine", chromedp.SetValue(chromedp.CSS("#qtype"), "imagine"),
		chromedp.Evaluate[chromedp.Void](`document.getElementById('qtype').dispatchEvent(new Event('change'))`))
	ask(t, ctx, "a lighthouse at dusk", 4)
	waitJS(t, ctx, "the picture", `(() => {
		const img = document.querySelector('.msg.assistant:last-child .bubble img');
		return img && img.src.startsWith('data:image/png;base64,') && img.complete && img.naturalWidth === 64;
	})()`)
	do(t, ctx, "choosing text to speech", chromedp.SetValue(chromedp.CSS("#qtype"), "tts"),
		chromedp.Evaluate[chromedp.Void](`document.getElementById('qtype').dispatchEvent(new Event('change'))`))
	ask(t, ctx, "hello from the swarm", 5)
	waitJS(t, ctx, "the audio player", `(() => {
		const a = document.querySelector('.msg.assistant:last-child .bubble audio');
		return a && a.controls && a.src.startsWith('data:audio/wav;base64,') && a.readyState >= 1 && a.duration > 0.4;
	})()`)

	if path := os.Getenv("MTOR_SCREENSHOT"); path != "" {
		png := run(t, ctx, "screenshot", chromedp.FullScreenshot(100))
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// The conversation survives a reload (it lives in localStorage).
	do(t, ctx, "reloading", chromedp.Navigate(url))
	waitJS(t, ctx, "the restored conversation", `document.querySelectorAll('.msg').length === 10`)
	restored := run(t, ctx, "reading the restored conversation", chromedp.Evaluate[string](`document.getElementById('messages').textContent`))
	if !strings.Contains(restored, "You said: "+question) || !strings.Contains(restored, evil) {
		t.Errorf("restored conversation lacks the earlier answers")
	}
	if n := run(t, ctx, "counting images", chromedp.Evaluate[int](`document.querySelectorAll('img').length`)); n != 1 {
		t.Errorf("restored conversation has %d img elements, want only the imagined picture", n)
	}
}

// A bridge with API keys wants ?key= on /ws; the page takes the key from
// its URL fragment, which never reaches the server, and drops it from the
// address bar. It also shows a query's energy when the worker reports it.
func TestBrowserAPIKeyFromFragment(t *testing.T) {
	ctx := browser(t)
	// In-process demo swarm; its energy figure is a fake (no GPU here), to
	// see the page show energy when a worker reports it.
	sw, err := wstest.New(wstest.WithFakeEnergy(5))
	if err != nil {
		t.Fatal(err)
	}
	wss := ws.New(sw)
	mux := http.NewServeMux()
	var keys []string
	var mu sync.Mutex
	mux.Handle("/ws", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		keys = append(keys, r.URL.Query().Get("key"))
		mu.Unlock()
		if r.URL.Query().Get("key") != "s3cret" {
			http.Error(w, "bad key", http.StatusUnauthorized)
			return
		}
		wss.ServeHTTP(w, r)
	}))
	mux.HandleFunc("/api/swarm", func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"peers": sw.Peers(), "models": sw.Models()})
	})
	mux.Handle("/", webui.Handler())
	hs := httptest.NewServer(mux)
	t.Cleanup(func() {
		wss.Close()
		hs.Close()
	})
	do(t, ctx, "loading the page with a key", chromedp.Navigate(hs.URL+"/#key=s3cret"))
	waitJS(t, ctx, "the connection", `document.getElementById('conn').dataset.state === 'open'`)
	if u := run(t, ctx, "reading the address", chromedp.Evaluate[string](`location.href`)); strings.Contains(u, "s3cret") {
		t.Errorf("the key stays in the address bar: %s", u)
	}
	ask(t, ctx, "with a key", 1)
	meta := run(t, ctx, "reading the answer's meta", chromedp.Evaluate[string](`document.querySelector('.msg.assistant .meta').textContent`))
	if !strings.Contains(meta, " J") {
		t.Errorf("answer meta %q does not show the energy the worker reported", meta)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(keys) == 0 || keys[0] != "s3cret" {
		t.Errorf("keys seen on /ws: %q", keys)
	}
}
