package bridge

import (
	"encoding/json"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestTokenEventsMatchTheChunk: a token's event rendered from the
// template is byte for byte the chunk encoding/json writes, whatever the
// text holds.
func TestTokenEventsMatchTheChunk(t *testing.T) {
	for _, usage := range []any{nil, json.RawMessage("null")} {
		mk := func(text string) chatChunk {
			return chatChunk{ID: "chatcmpl-1", Object: "chat.completion.chunk", Created: 7, Model: `m"<x>`, Usage: usage,
				Choices: []chunkChoice{{Delta: chunkDelta{Content: &text}}}}
		}
		empty := ""
		te, err := newTokenEvents(mk(empty))
		if err != nil {
			t.Fatal(err)
		}
		// Plain ASCII takes the fast path (plainJSON); the rest
		// encoding/json's escaping.
		for _, text := range []string{"zq ", "", "a", "plain words, 42 + 1 = 43!", "~`{|}^_[]#$%'()*/:;=?@", "\x7f", "a&b",
			`"quoted" \\ back`, "<b>&amp;</b>", "line\nbreak\ttab", "émoji 🙂", "\x00\u2028", "\xff invalid"} {
			rec := httptest.NewRecorder()
			out := newSSE(rec, newSSEBufs())
			stop := out.run(DefaultKeepAlive)
			if err := te.event(out, text); err != nil {
				t.Fatal(err)
			}
			stop()
			want, _ := json.Marshal(mk(text))
			if got := rec.Body.String(); got != "data: "+string(want)+"\n\n" {
				t.Fatalf("usage %v, text %q:\n got %s\nwant data: %s", usage, text, got, want)
			}
			if !strings.Contains(rec.Header().Get("Content-Type"), "text/event-stream") {
				t.Fatalf("content type %q", rec.Header().Get("Content-Type"))
			}
		}
	}
}

// TestPlainJSON: which token texts skip encoding/json (the event test
// above checks that their bytes match it either way).
func TestPlainJSON(t *testing.T) {
	cases := map[string]bool{
		"": true, "zq ": true, "Hello, world!": true, "a~z{}[]:;": true,
		`"`: false, `\`: false, "<": false, ">": false, "&": false,
		"\n": false, "\x1f": false, "\x7f": false, "é": false, "\u2028": false, "\xff": false,
	}
	for text, want := range cases {
		if got := plainJSON(text); got != want {
			t.Errorf("plainJSON(%q) = %v, want %v", text, got, want)
		}
	}
}

// TestKeepAliveAfterEventsStop: the keep-alive looks for new events at
// its ticks instead of stamping each one; a stream that goes silent after
// some events still gets its comment once the silence lasts.
func TestKeepAliveAfterEventsStop(t *testing.T) {
	const every = 100 * time.Millisecond
	rec := httptest.NewRecorder()
	out := newSSE(rec, newSSEBufs())
	stop := out.run(every)
	for range 5 {
		if err := out.event(map[string]string{"x": "y"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(every / 10)
	}
	time.Sleep(3 * every) // at most every*3/2 is needed
	stop()
	body := rec.Body.String()
	last := strings.LastIndex(body, "data: ")
	if last < 0 || !strings.Contains(body[last:], ": keep-alive\n\n") {
		t.Fatalf("no keep-alive after the last event in %q", body)
	}
}

// TestSSEQueueBound: events that together pass the queue's bound, and one
// larger than the bound by itself, all arrive whole and in order.
func TestSSEQueueBound(t *testing.T) {
	rec := httptest.NewRecorder()
	out := newSSE(rec, newSSEBufs())
	stop := out.run(DefaultKeepAlive)
	var want strings.Builder
	for i, n := range []int{maxPendingSSE / 2, maxPendingSSE / 2, 2 * maxPendingSSE, 100, maxPendingSSE - 10} {
		ev := strings.Repeat(string(rune('a'+i)), n)
		if err := out.queue([]byte(ev)); err != nil {
			t.Fatal(err)
		}
		want.WriteString(ev)
	}
	stop()
	if got := rec.Body.String(); got != want.String() {
		t.Fatalf("got %d bytes, want %d in order", len(got), want.Len())
	}
}

// gatedResponse holds each Write until the test lets it go, and keeps the
// bytes as they are then: a client's socket that is full copies late.
type gatedResponse struct {
	header           http.Header
	entered, proceed chan struct{}
	body             []byte
}

func (g *gatedResponse) Header() http.Header { return g.header }
func (g *gatedResponse) WriteHeader(int)     {}
func (g *gatedResponse) Flush()              {}
func (g *gatedResponse) Write(b []byte) (int, error) {
	g.entered <- struct{}{}
	<-g.proceed
	g.body = append(g.body, b...)
	return len(b), nil
}

// TestSSEBigEventBufferNotReused: the buffer of a write too big to keep
// (one event over the bound) is dropped, and the events queued during a
// later write never land in the bytes that write is still sending.
func TestSSEBigEventBufferNotReused(t *testing.T) {
	g := &gatedResponse{header: http.Header{}, entered: make(chan struct{}), proceed: make(chan struct{})}
	out := newSSE(g, newSSEBufs())
	stop := out.run(DefaultKeepAlive)
	events := []string{strings.Repeat("a", 2*maxPendingSSE+1), strings.Repeat("b", 100), strings.Repeat("c", 100)}
	queue := func(ev string) {
		if err := out.queue([]byte(ev)); err != nil {
			t.Fatal(err)
		}
	}
	queue(events[0])
	<-g.entered
	g.proceed <- struct{}{}
	queue(events[1])
	<-g.entered // b's write is under way
	queue(events[2])
	g.proceed <- struct{}{}
	<-g.entered // c's own
	g.proceed <- struct{}{}
	stop()
	out.finish()
	if got, want := string(g.body), strings.Join(events, ""); got != want {
		t.Fatalf("the client got %d bytes ending %q, want %d ending %q", len(got), got[len(got)-120:], len(want), want[len(want)-120:])
	}
}

// TestUsageSumsDoNotWrap: a worker's figures are its own and may be
// absurd; the bridge's sums of them saturate instead of wrapping.
func TestUsageSumsDoNotWrap(t *testing.T) {
	res := &router.Result{Done: &pb.Done{Usage: &pb.Usage{PromptTokens: math.MaxUint32, CompletionTokens: math.MaxUint32}, EnergyMj: 1 << 62}}
	if u := usageOf(res); u.TotalTokens != 2*math.MaxUint32 {
		t.Errorf("total_tokens %d, want %d", u.TotalTokens, uint64(2*math.MaxUint32))
	}
	b := newUsageBook(8)
	for range 5 {
		b.record("c", res)
	}
	if got := b.m["c"].EnergyMJ; got != math.MaxUint64 {
		t.Errorf("energy after 5 × 2^62 mJ: %d, want the largest uint64", got)
	}
}
