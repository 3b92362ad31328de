package main

// Mid-answer continuation on a real engine (issue 10): llama.cpp engines
// (node/enginetest) behind real `mtor node` workers, a bridge node, and an
// OpenAI streaming client; the worker writing the answer is SIGKILLed at a
// random point, again and again. Each answer must complete, and the client's
// text must be exactly what the first engine wrote up to the seam followed
// by what the next engine wrote after it.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/enginetest"
)

// contAnswer is what a streaming OpenAI client read.
type contAnswer struct {
	text   string
	seen   string // the text read when the worker was killed
	finish string
	info   struct {
		Peer      string   `json:"peer"`
		Continued int      `json:"continued"`
		Writers   []string `json:"writers"`
	}
	completionTokens int
}

func TestE2EContinuationOnRealEngine(t *testing.T) {
	needBinary(t)
	runs := 100
	if s := os.Getenv("MTOR_CONT_RUNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("MTOR_CONT_RUNS=%q: %v", s, err)
		}
		runs = n
	}
	const model = "tiny"
	dir := t.TempDir()
	quic := []string{"--listen", "/ip4/127.0.0.1/udp/0/quic-v1"}
	bridge := startNode(t, "bridge", append(nodeArgs(filepath.Join(dir, "bridge"), "--no-detect", "--bridge", "127.0.0.1:0"), quic...)...)
	base := strings.TrimSuffix(bridge.value("bridge"), "/")

	// Two kinds of backend in front of the engines: OpenAI-compatible
	// (declared able to continue, as llama.cpp's server is) and Ollama's.
	specs := []func(url string) string{
		func(u string) string { return "openai=" + u + ",features=continue" },
		func(u string) string { return "ollama=" + u },
		func(u string) string { return "openai=" + u + ",features=continue" },
	}
	engines := make([]*enginetest.Engine, len(specs))
	workers := make([]*proc, len(specs))
	ids := make([]string, len(specs))
	start := func(i int) *proc {
		return startNode(t, fmt.Sprintf("worker%d", i), append(nodeArgs(filepath.Join(dir, fmt.Sprint("w", i)),
			"--backend", specs[i](engines[i].URL()), "--join", bridge.value("join")), quic...)...)
	}
	for i := range specs {
		engines[i] = enginetest.Start(t, enginetest.WithSequences(2))
		workers[i] = start(i)
		ids[i] = workers[i].value("peer")
	}
	hc := &http.Client{}
	defer hc.CloseIdleConnections()

	continued, openaiSeams, ollamaSeams, missed := 0, 0, 0, 0
	for run := 0; run < runs; {
		waitWorkers(t, bridge.value("api"), model, ids...)
		before := make([]int, len(engines))
		started := make([]int, len(engines))
		for i, e := range engines {
			g, err := e.Generations(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			before[i] = len(g)
			st, err := e.Stats(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			started[i] = st.Started
		}
		killAt := 1 + rand.IntN(30)
		victim := -1
		ans, err := streamChat(t.Context(), hc, base, model, fmt.Sprintf("story %d", run), 200, killAt, func() {
			// The engine that started this run's generation and is still
			// writing belongs to the worker to kill.
			for i, e := range engines {
				st, err := e.Stats(t.Context())
				if err == nil && st.Started > started[i] && st.Active > 0 {
					victim = i
					if _, err := workers[i].signal(syscall.SIGKILL); err != nil {
						t.Errorf("kill worker%d: %v", i, err)
					}
					return
				}
			}
		})
		if err != nil {
			t.Fatalf("run %d (kill after %d chunks, worker%d killed): %v", run, killAt, victim, err)
		}
		if victim < 0 {
			// The engine had written the whole answer (or the random model
			// ended it early) before the client read killAt chunks: no
			// seam to test; ask again.
			if missed++; missed > runs/2 {
				t.Fatalf("%d answers were over before the kill point: the engine is too fast for this test", missed)
			}
			continue
		}
		// The seams: what the engines wrote, from their own logs.
		first, tried := seamsOf(t, engines, before, victim)
		conts := taken(tried, ans.text)
		last := conts[len(conts)-1]
		// The answer ends as the last engine ended it: at max_tokens, or
		// where the random model emitted an end token (rarely: it is
		// biased against them).
		if ans.finish != last.Reason || ans.info.Continued != len(conts) || ans.info.Peer == ids[victim] {
			t.Fatalf("run %d: finish %q, continued %d, answered by %s (killed worker%d %s); the engines: first %+v, continuations %+v", run, ans.finish, ans.info.Continued, ans.info.Peer, victim, ids[victim], first, conts)
		}
		if len(ans.info.Writers) != len(conts)+1 || ans.info.Writers[0] != ids[victim] || ans.info.Writers[len(conts)] != ans.info.Peer {
			t.Fatalf("run %d: mtor.writers %v, want the killed worker %s first and %s last, %d in all", run, ans.info.Writers, ids[victim], ans.info.Peer, len(conts)+1)
		}
		continued += ans.info.Continued
		if !strings.HasPrefix(conts[0].Prefix, ans.seen) {
			t.Fatalf("run %d: the next engine was asked to continue %q, but the client had already read %q", run, conts[0].Prefix, ans.seen)
		}
		// Each engine continued exactly text that the engines before it
		// wrote: nothing lost, nothing twice.
		written := first.Text
		for _, c := range conts {
			if !strings.HasPrefix(written, c.Prefix) {
				t.Fatalf("run %d: an engine was asked to continue %q, which is not what was written before it (%q)", run, c.Prefix, written)
			}
			written = c.Prefix + c.Text
		}
		if ans.text != written {
			t.Fatalf("run %d: client read %q\nwant %q, what the engines wrote (first %+v, continuations %+v)", run, ans.text, written, first, conts)
		}
		cont := last
		if cont.Reason == "length" && ans.completionTokens != 200 {
			t.Errorf("run %d: usage says %d completion tokens, want the 200 asked for", run, ans.completionTokens)
		}
		if victim == 1 {
			ollamaSeams++
		} else {
			openaiSeams++
		}
		workers[victim] = start(victim)
		run++
	}
	t.Logf("%d answers, each with its worker SIGKILLed mid-answer: all complete, %d continuations, seams exact (%d killed behind the openai backend, %d behind ollama; %d more answers were over before their kill point)",
		runs, continued, openaiSeams, ollamaSeams, missed)
}

// taken picks from tries (continuations, by the length of what they
// continued) those whose output reached the client, one per seam. Tries
// that continued the same text are one seam: the router gave up all but
// the last of them before their output reached it (a busy machine can
// hold a worker's first output past the router's bounds), so they took
// nothing over and are not counted as continuations, though their engines
// had begun. Of a seam's tries, the one taken wrote the start of the next
// seam's text (the last seam: the whole answer, final); when none did,
// the seam's first is returned, for the test's checks to report.
func taken(tries []enginetest.Generation, final string) []enginetest.Generation {
	var out []enginetest.Generation
	for i := 0; i < len(tries); {
		j := i
		for j < len(tries) && tries[j].Prefix == tries[i].Prefix {
			j++
		}
		want, last := final, j == len(tries)
		if !last {
			want = tries[j].Prefix
		}
		pick := tries[i]
		for _, c := range tries[i:j] {
			if w := c.Prefix + c.Text; (last && w == want) || (!last && strings.HasPrefix(w, want)) {
				pick = c
				break
			}
		}
		out = append(out, pick)
		i = j
	}
	return out
}

// seamsOf finds, in the engines' logs since before, the generation the
// killed worker's engine began and the continuations other engines wrote
// after it, in order (a continuation's worker may fail in turn), once no
// engine is generating.
func seamsOf(t *testing.T, engines []*enginetest.Engine, before []int, victim int) (first enginetest.Generation, conts []enginetest.Generation) {
	t.Helper()
	// Generous: on CI this runs beside the rest of the suite on two cores,
	// and a killed worker's engine notices the abort only at its next write.
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	var firsts []enginetest.Generation
	active := 0
	fail := func(err error) {
		t.Helper()
		t.Fatalf("engine logs: %d first generations on the killed worker's engine, %d continuations, %d generating: want 1, at least 1, 0 (%+v %+v); last read: %v", len(firsts), len(conts), active, firsts, conts, err)
	}
	for {
		var fs, cs []enginetest.Generation
		act := 0
		var err error
		for i, e := range engines {
			var st enginetest.Stats
			if st, err = e.Stats(ctx); err != nil {
				break
			}
			act += st.Active
			var gs []enginetest.Generation
			if gs, err = e.Generations(ctx); err != nil {
				break
			}
			for _, g := range gs[min(before[i], len(gs)):] {
				switch {
				case i == victim && g.Prefix == "":
					fs = append(fs, g)
				case g.Prefix != "":
					cs = append(cs, g)
				}
			}
		}
		if err != nil {
			// A read cut short by the deadline: report what was last seen.
			fail(err)
		}
		firsts, conts, active = fs, cs, act
		if active == 0 && len(firsts) == 1 && len(conts) >= 1 {
			slices.SortStableFunc(conts, func(a, b enginetest.Generation) int { return len(a.Prefix) - len(b.Prefix) })
			return firsts[0], conts
		}
		if ctx.Err() != nil || len(firsts) > 1 {
			fail(ctx.Err())
		}
		time.Sleep(20 * time.Millisecond) // an aborted generation is logged once its engine notices
	}
}

// streamChat asks for a streamed answer of maxTokens tokens and calls kill
// once killAt chunks of text have arrived.
func streamChat(ctx context.Context, hc *http.Client, base, model, prompt string, maxTokens, killAt int, kill func()) (contAnswer, error) {
	var a contAnswer
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	body, _ := json.Marshal(map[string]any{"model": model, "stream": true, "max_tokens": maxTokens, "temperature": 0,
		"stream_options": map[string]bool{"include_usage": true},
		"messages":       []map[string]string{{"role": "user", "content": prompt}}})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(body))
	if err != nil {
		return a, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return a, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	var text strings.Builder
	chunks := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			a.text = text.String()
			return a, nil
		}
		var ev struct {
			Choices []struct {
				Delta        struct{ Content string }
				FinishReason *string `json:"finish_reason"`
			}
			Mtor  json.RawMessage
			Usage *struct {
				CompletionTokens int `json:"completion_tokens"`
			}
			Error *struct{ Message, Code string }
		}
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			return a, fmt.Errorf("bad SSE event %q: %w", data, err)
		}
		if ev.Error != nil {
			return a, fmt.Errorf("SSE error %s: %s (after %q)", ev.Error.Code, ev.Error.Message, text.String())
		}
		for _, c := range ev.Choices {
			if c.Delta.Content != "" {
				text.WriteString(c.Delta.Content)
				if chunks++; chunks == killAt {
					a.seen = text.String()
					kill()
				}
			}
			if c.FinishReason != nil {
				a.finish = *c.FinishReason
			}
		}
		if len(ev.Mtor) > 0 {
			if err := json.Unmarshal(ev.Mtor, &a.info); err != nil {
				return a, err
			}
		}
		if ev.Usage != nil {
			a.completionTokens = ev.Usage.CompletionTokens
		}
	}
	return a, fmt.Errorf("stream ended without [DONE] after %q: %v", text.String(), sc.Err())
}

// TestTaken: a continuation the router gave up before its output reached
// it (the next try continues the same text) is not a seam; one that wrote
// and then died is.
func TestTaken(t *testing.T) {
	g := func(prefix, text, reason string) enginetest.Generation {
		return enginetest.Generation{Prefix: prefix, Text: text, Reason: reason}
	}
	for _, tc := range []struct {
		name  string
		tries []enginetest.Generation
		final string
		want  []string // Prefix+Text of the seams' tries
	}{
		{"one continuation", []enginetest.Generation{g("ab", "cd", "length")}, "abcd", []string{"abcd"}},
		{"given up before it wrote (the CI case)", []enginetest.Generation{g("ab", "X", "abort"), g("ab", "X8Kb", "length")}, "abX8Kb", []string{"abX8Kb"}},
		{"the given-up try logged last", []enginetest.Generation{g("ab", "X8Kb", "length"), g("ab", "X", "abort")}, "abX8Kb", []string{"abX8Kb"}},
		{"wrote, then died", []enginetest.Generation{g("ab", "cdef", "abort"), g("abcd", "gh", "length")}, "abcdgh", []string{"abcdef", "abcdgh"}},
		{"given up, then a seam, then given up", []enginetest.Generation{g("ab", "c", "abort"), g("ab", "cde", "abort"), g("abcd", "x", "abort"), g("abcd", "xyz", "stop")}, "abcdxyz", []string{"abcde", "abcdxyz"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, c := range taken(tc.tries, tc.final) {
				got = append(got, c.Prefix+c.Text)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("taken = %q, want %q", got, tc.want)
			}
		})
	}
}
