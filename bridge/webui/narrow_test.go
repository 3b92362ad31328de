package webui_test

import (
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/mtor-swarm/mtor/node/swarmtest"
)

// visibleAndOnTop is JavaScript that scrolls the element with id into
// view and reports whether it is inside the viewport and nothing covers
// it: elementFromPoint at its centre and just inside each corner is the
// element itself (a clipped or covered corner shows another element).
const visibleAndOnTop = `((id) => {
	const el = document.getElementById(id);
	el.scrollIntoView({block: 'center'});
	const r = el.getBoundingClientRect();
	const pts = [[r.left + r.width / 2, r.top + r.height / 2], [r.left + 3, r.top + 3], [r.right - 3, r.top + 3],
		[r.left + 3, r.bottom - 3], [r.right - 3, r.bottom - 3]];
	const misses = [];
	for (const [x, y] of pts) {
		const hit = document.elementFromPoint(x, y);
		if (!(hit === el || el.contains(hit))) misses.push([x, y, hit ? hit.tagName + '#' + hit.id + '.' + hit.className : 'nothing']);
	}
	return {
		w: r.width, h: r.height, left: r.left, right: r.right,
		vw: document.documentElement.clientWidth,
		onTop: misses.length === 0, misses: misses,
	};
})`

// At 400 px wide (a phone) the prompt and Send are on screen, not
// covered by the swarm card, and a question typed and sent is answered.
func TestBrowserNarrow400(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1))
	client := sw.Clients[0]
	url := bridge(t, client.Router(), client.ID().String())
	ctx := browser(t)

	do(t, ctx, "loading the page at 400 px", chromedp.EmulateViewport(400, 700), chromedp.Navigate(url))
	waitJS(t, ctx, "the connection and the model list",
		`document.getElementById('conn').dataset.state === 'open' && document.getElementById('model').value === 'demo'`)
	// The swarm card has its row by now: it is laid out at full size.
	waitJS(t, ctx, "the worker in the swarm view", `document.querySelectorAll('#peers tbody tr[data-peer]').length === 1`)
	for _, id := range []string{"prompt", "send"} {
		got := run(t, ctx, "checking #"+id, chromedp.Evaluate[map[string]any](visibleAndOnTop+"('"+id+"')"))
		if got["onTop"] != true || got["w"].(float64) < 20 || got["h"].(float64) < 20 ||
			got["left"].(float64) < 0 || got["right"].(float64) > got["vw"].(float64) {
			t.Errorf("#%s at 400 px is not visible and on top: %v", id, got)
		}
	}
	// No sideways scrolling either.
	if w := run(t, ctx, "page width", chromedp.Evaluate[float64](`document.documentElement.scrollWidth`)); w > 400 {
		t.Errorf("the page is %v px wide at a 400 px viewport", w)
	}
	// Usable: a real click on Send (at its centre) sends the question.
	ask(t, ctx, "hello from a phone", 1)
	answer := run(t, ctx, "reading the answer", chromedp.Evaluate[string](`document.querySelector('.msg.assistant .bubble').textContent`))
	if !strings.Contains(answer, "You said: hello from a phone") {
		t.Fatalf("answer %q", answer)
	}
}

// A swarm without workers tells the visitor how to add one, and a swarm
// without GPUs is not said to route to "the best GPU".
func TestBrowserEmptySwarmSaysHowToAddAWorker(t *testing.T) {
	sw := swarmtest.New(t, swarmtest.Workers(0), swarmtest.Clients(1))
	client := sw.Clients[0]
	url := bridge(t, client.Router(), client.ID().String())
	ctx := browser(t)

	do(t, ctx, "loading the page", chromedp.Navigate(url))
	waitJS(t, ctx, "the swarm summary", `document.getElementById('swarm-summary').textContent.includes('0 workers')`)
	text := run(t, ctx, "reading the page", chromedp.Evaluate[string](`document.body.innerText`))
	for _, want := range []string{"mtor join-token", "mtor node --backend", "--join"} {
		if !strings.Contains(text, want) {
			t.Errorf("the page of an empty swarm does not say %q:\n%s", want, text)
		}
	}
	if strings.Contains(strings.ToLower(text), "best gpu") {
		t.Errorf("a swarm with 0 GPUs claims the best GPU:\n%s", text)
	}
	vis := run(t, ctx, "checking the help", chromedp.Evaluate[bool](`document.getElementById('add-worker').offsetHeight > 0`))
	if !vis {
		t.Error("the how-to-add-a-worker help is not visible")
	}
}
