package bridge

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type chatMessageOut struct {
	Role      string         `json:"role"`
	Content   string         `json:"content"` // null in JSON when the model only called tools
	Refusal   *string        `json:"refusal"`
	ToolCalls []chatToolCall `json:"tool_calls,omitempty"`
}

// MarshalJSON writes content null for a message of tool calls alone, as
// OpenAI does.
func (m chatMessageOut) MarshalJSON() ([]byte, error) {
	type plain chatMessageOut
	if m.Content != "" || len(m.ToolCalls) == 0 {
		return json.Marshal(plain(m))
	}
	return json.Marshal(struct {
		plain
		Content *string `json:"content"`
	}{plain: plain(m)})
}

type chatChoice struct {
	Index        int            `json:"index"`
	Message      chatMessageOut `json:"message"`
	Logprobs     any            `json:"logprobs"`
	FinishReason string         `json:"finish_reason"`
}

type chatCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []chatChoice `json:"choices"`
	Usage             usage        `json:"usage"`
	SystemFingerprint *string      `json:"system_fingerprint"`
	Mtor              *mtorInfo    `json:"mtor,omitempty"`
}

type chunkDelta struct {
	Role      string         `json:"role,omitempty"`
	Content   *string        `json:"content,omitempty"`
	ToolCalls []chatToolCall `json:"tool_calls,omitempty"`
}

type chunkChoice struct {
	Index        int        `json:"index"`
	Delta        chunkDelta `json:"delta"`
	Logprobs     any        `json:"logprobs"`
	FinishReason *string    `json:"finish_reason"`
}

// chatChunk is one SSE event of a streamed completion, in OpenAI's format.
type chatChunk struct {
	ID                string        `json:"id"`
	Object            string        `json:"object"`
	Created           int64         `json:"created"`
	Model             string        `json:"model"`
	SystemFingerprint *string       `json:"system_fingerprint"`
	Choices           []chunkChoice `json:"choices"`
	Usage             any           `json:"usage,omitempty"` // null on every chunk but the last when usage is asked for
	Mtor              *mtorInfo     `json:"mtor,omitempty"`
}

// finishReason is the backend's, passed through by the worker; for a
// worker from before Done.finish_reason it is "length" when the answer used
// up max_tokens, "tool_calls" when it called tools, else "stop".
func finishReason(q *pb.QueryRequest, res *router.Result, calledTools bool) string {
	if r := res.Done.GetFinishReason(); r != "" {
		return r
	}
	if calledTools {
		return protocol.FinishToolCalls
	}
	if m := q.GetParams().GetMaxTokens(); m > 0 && res.Done.GetUsage().GetCompletionTokens() >= m {
		return protocol.FinishLength
	}
	return protocol.FinishStop
}

func (s *Server) handleChat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	q := decodeQuery(s, w, r, &req, func(c *chatRequest) (*pb.QueryRequest, *apiError) {
		return chatToQuery(c, limits{maxMedia: s.cfg.maxMedia})
	})
	if q == nil {
		return
	}
	if aerr := s.checkFeatures(q); aerr != nil {
		writeError(w, aerr)
		return
	}
	id := "chatcmpl-" + hex.EncodeToString(q.Id)
	created := time.Now().Unix()
	if req.Stream {
		s.streamChat(w, r, q, id, created, req.StreamOptions != nil && req.StreamOptions.IncludeUsage)
		return
	}
	ans := answer{max: s.cfg.maxAnswer}
	var overflow *apiError
	res, aerr := s.queryWhole(r.Context(), q, ans.reset, func(ev *pb.Event) error {
		if !ans.add(ev, q.GetParams().GetLogprobs()) {
			overflow = responseTooLarge(s.cfg.maxAnswer, "; ask with stream: true, or a lower max_tokens")
			return overflow
		}
		return nil
	})
	if overflow != nil {
		aerr = overflow
	}
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	info := infoOf(res) // the peer's base58 form, encoded once
	w.Header().Set(peerHeader, info.Peer)
	writeJSON(w, http.StatusOK, chatCompletion{
		ID:      id,
		Object:  "chat.completion",
		Created: created,
		Model:   q.Model,
		Choices: []chatChoice{{
			Message:      ans.message(),
			Logprobs:     ans.logprobsOut(q),
			FinishReason: finishReason(q, res, len(ans.calls) > 0),
		}},
		Usage: usageOf(res),
		Mtor:  info,
	})
}

// sse writes server-sent events. Headers go out with the first event, so
// that a query refused before any worker accepted it still gets its proper
// HTTP status; each write has its own deadline so that a stalled reader
// cancels the query instead of holding it.
//
// Events are queued and written by one goroutine (which also sends the
// keep-alive comments): events that arrive while a write and flush are
// under way go out together in the next one, so a client that reads
// slower than the tokens come costs one write and flush per batch, not
// per token. The queue is bounded (maxPendingSSE); event blocks when it
// is full.
type sse struct {
	mu         sync.Mutex
	cond       *sync.Cond
	w          http.ResponseWriter
	rc         *http.ResponseController
	started    bool   // the status line is (to be) sent: something was queued
	sentHeader bool   // the writer has sent it
	queued     uint64 // events queued so far, for the keep-alive's look
	pending    []byte
	spare      []byte
	err        error // of a write: the client is gone
	stopped    bool
	// held: writes are no longer flushed; the handler's return flushes
	// them with the body's end (see hold).
	held bool
	wake chan struct{}
	bufs *sync.Pool // where pending and spare come from and go back
}

// maxPendingSSE bounds the bytes of events waiting for the writer: about
// a hundred tokens' events, one write and flush. Its buffers grow to it
// by doubling and go back to the pool at that size, so a stream whose
// events come faster than it writes them grows none after the first few.
const maxPendingSSE = 16 << 10

// DefaultKeepAlive is how long a stream may stay silent (a query queued or
// a slow model) before the bridge sends an SSE comment, so that proxies
// with a read timeout (nginx: 60 s) do not cut it.
const DefaultKeepAlive = 15 * time.Second

// run starts the writer, which also writes ": keep-alive" whenever nothing
// was written for every; stop writes what is queued and waits for the
// writer to end; after it the handler writes to w itself. After the first
// keep-alive the status line is sent, so a later refusal arrives as an
// error event rather than its HTTP status.
func (e *sse) run(every time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(every / 2)
		defer t.Stop()
		// Silence is measured at the ticks, not stamped per event (a
		// clock read per token showed in profiles): the stream is quiet
		// since the tick that last saw new events, so a keep-alive
		// follows the last event after every to every*3/2, as a stamp
		// checked at these ticks would.
		quiet, seen := time.Now(), uint64(0)
		for {
			select {
			case <-done:
				e.writePending()
				return
			case <-e.wake:
				e.writePending()
			case now := <-t.C:
				e.mu.Lock()
				if e.queued != seen {
					seen, quiet = e.queued, now
				} else if now.Sub(quiet) >= every && e.err == nil {
					quiet = now
					e.started = true
					e.pending = append(e.pending, ": keep-alive\n\n"...)
				}
				e.mu.Unlock()
				e.writePending()
			}
		}
	})
	var once sync.Once
	return func() {
		once.Do(func() {
			close(done)
			wg.Wait()
			e.mu.Lock()
			e.stopped = true
			e.cond.Broadcast()
			e.mu.Unlock()
		})
	}
}

// newSSE writes to w; its two queue buffers come from bufs (nil: its own)
// and go back there at finish.
func newSSE(w http.ResponseWriter, bufs *sync.Pool) *sse {
	e := &sse{w: w, rc: http.NewResponseController(w), wake: make(chan struct{}, 1), bufs: bufs}
	e.cond = sync.NewCond(&e.mu)
	if bufs != nil {
		e.pending, e.spare = bufs.Get().([]byte)[:0], bufs.Get().([]byte)[:0]
	}
	return e
}

// newSSEBufs is the pool of the streams' queue buffers: a stream's events
// are a few KiB, and a buffer grown for each stream was most of the
// bytes a streamed answer allocated.
func newSSEBufs() *sync.Pool {
	return &sync.Pool{New: func() any { return make([]byte, 0, 4<<10) }}
}

func (e *sse) writeHeader() {
	h := e.w.Header()
	h.Set("Content-Type", "text/event-stream; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell reverse proxies not to buffer
	h.Set("Trailer", peerHeader)
	e.w.WriteHeader(http.StatusOK)
}

// writePending writes and flushes what is queued, in one write.
func (e *sse) writePending() {
	e.mu.Lock()
	buf := e.pending
	if len(buf) == 0 || e.err != nil {
		e.mu.Unlock()
		return
	}
	e.pending = e.spare[:0]
	first := !e.headerSent()
	e.mu.Unlock()
	if first {
		e.writeHeader()
	}
	err := e.write(buf)
	e.mu.Lock()
	if cap(buf) <= 2*maxPendingSSE {
		e.spare = buf[:0]
	} else {
		// Too big to keep; so is the old spare, which pending took at
		// the swap: handed out again it would be both the next write's
		// bytes and the events queued during that write (and go back to
		// the pool twice at finish, to two streams).
		e.spare = nil
	}
	if err != nil {
		e.err, e.pending = err, nil
	}
	e.cond.Broadcast()
	e.mu.Unlock()
}

// headerSent is set once the writer has sent the status line.
func (e *sse) headerSent() bool {
	sent := e.sentHeader
	e.sentHeader = true
	return sent
}

func (e *sse) write(data []byte) error {
	_ = e.rc.SetWriteDeadline(time.Now().Add(defaultWriteTimeout))
	if _, err := e.w.Write(data); err != nil {
		return err
	}
	e.mu.Lock()
	held := e.held
	e.mu.Unlock()
	if held {
		return nil
	}
	return e.rc.Flush()
}

// hold stops flushing: what is written from now on (the answer's last
// events and [DONE]) leaves when the handler returns, in one write with
// the end of the chunked body and its trailer, instead of three. Call it
// only when the handler is about to return.
func (e *sse) hold() {
	e.mu.Lock()
	e.held = true
	e.mu.Unlock()
}

// queue adds raw event bytes for the writer; while the writer is stopped
// (before run, after stop) it writes them itself.
func (e *sse) queue(b ...[]byte) error {
	n := 0
	for _, s := range b {
		n += len(s)
	}
	e.mu.Lock()
	// An event that would take the queue past its bound waits for the
	// writer; one larger than the bound goes alone.
	for e.err == nil && !e.stopped && len(e.pending) > 0 && len(e.pending)+n > maxPendingSSE {
		e.cond.Wait()
	}
	if e.err != nil {
		defer e.mu.Unlock()
		return e.err
	}
	e.started = true
	e.queued++
	if need := len(e.pending) + n; need > cap(e.pending) {
		// Doubling: append's 1.25× steps copied a buffer a dozen times
		// on its way to the bound, and left it too big for the pool.
		grown := make([]byte, len(e.pending), max(need, min(2*cap(e.pending), maxPendingSSE)))
		copy(grown, e.pending)
		e.pending = grown
	}
	for _, s := range b {
		e.pending = append(e.pending, s...)
	}
	if e.stopped {
		e.mu.Unlock()
		e.writePending()
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.err
	}
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default: // the writer is awake already and will see these bytes
	}
	return nil
}

// event sends one "data: <json>" event.
func (e *sse) event(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return e.queue([]byte("data: "), b, []byte("\n\n"))
}

func (e *sse) done() error { return e.queue([]byte("data: [DONE]\n\n")) }

// finish gives the queue buffers back; nothing may be queued after it.
func (e *sse) finish() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.bufs != nil {
		for _, b := range [][]byte{e.pending, e.spare} {
			if b != nil && cap(b) <= maxPendingSSE {
				e.bufs.Put(b[:0]) // boxes a slice header (24 B): what matters is the array
			}
		}
		e.pending, e.spare, e.bufs = nil, nil, nil
	}
}

func (e *sse) isStarted() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.started
}

func (s *Server) streamChat(w http.ResponseWriter, r *http.Request, q *pb.QueryRequest, id string, created int64, includeUsage bool) {
	out := newSSE(w, s.sseBufs)
	defer out.finish()
	stop := out.run(s.cfg.keepAlive)
	defer stop()
	var usageField any
	if includeUsage {
		usageField = json.RawMessage("null")
	}
	chunk := func(d chunkDelta, finish *string) chatChunk {
		return chatChunk{ID: id, Object: "chat.completion.chunk", Created: created, Model: q.Model, Usage: usageField,
			Choices: []chunkChoice{{Delta: d, FinishReason: finish}}}
	}
	empty := ""
	tokens, err := newTokenEvents(chunk(chunkDelta{Content: &empty}, nil))
	if err != nil {
		writeError(w, &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: "internal_error", Message: "encoding the response failed"})
		return
	}
	roleSent := false
	calledTools := false
	var calls callIndex
	sendRole := func() error {
		if roleSent {
			return nil
		}
		roleSent = true
		return out.event(chunk(chunkDelta{Role: "assistant", Content: &empty}, nil))
	}
	res, aerr := s.query(r.Context(), q, func(ev *pb.Event) error {
		switch k := ev.GetKind().(type) {
		case *pb.Event_Accepted:
			// Not yet: the backend may still refuse the request, and that
			// answer deserves its own HTTP status (a 400, not a 200 stream).
			return nil
		case *pb.Event_Chunk:
			if err := sendRole(); err != nil {
				return err
			}
			text := k.Chunk.GetText()
			if text == "" {
				return nil
			}
			if !q.GetParams().GetLogprobs() {
				return tokens.event(out, text)
			}
			content := text // taken by address: its own variable, so text stays on the stack
			c := chunk(chunkDelta{Content: &content}, nil)
			c.Choices[0].Logprobs = logprobsJSON(k.Chunk.GetLogprobs())
			return out.event(c)
		case *pb.Event_ToolCall:
			if err := sendRole(); err != nil {
				return err
			}
			calledTools = true
			return out.event(chunk(chunkDelta{ToolCalls: []chatToolCall{calls.delta(k.ToolCall)}}, nil))
		}
		return nil
	})
	if aerr != nil {
		stop() // from here on the handler writes itself
		if !out.isStarted() {
			writeError(w, aerr)
			return
		}
		if aerr.Status != statusClientClosed {
			// The status line is gone: OpenAI's clients read an error event.
			_ = out.event(aerr.body())
		}
		return
	}
	if err := sendRole(); err != nil {
		return
	}
	out.hold()
	reason := finishReason(q, res, calledTools)
	last := chunk(chunkDelta{}, &reason)
	last.Mtor = infoOf(res)
	if err := out.event(last); err != nil {
		return
	}
	if includeUsage {
		u := usageOf(res)
		final := chatChunk{ID: id, Object: "chat.completion.chunk", Created: created, Model: q.Model, Choices: []chunkChoice{}, Usage: u}
		if err := out.event(final); err != nil {
			return
		}
	}
	stop()
	w.Header().Set(peerHeader, last.Mtor.Peer) // trailer
	_ = out.done()
}

// tokenEvents writes the chunk events of plain tokens, the hot path of a
// stream: the chunk's JSON around its content is rendered once per stream,
// and each token costs only its quoted text.
type tokenEvents struct {
	prefix, suffix []byte
	quoted         bytes.Buffer  // a token's quoted text, reused
	enc            *json.Encoder // onto quoted: encoding/json's escaping, as for the whole chunk
}

// newTokenEvents splits the JSON of tmpl, a chunk whose delta content is
// "", around that content.
func newTokenEvents(tmpl chatChunk) (*tokenEvents, error) {
	b, err := json.Marshal(tmpl)
	if err != nil {
		return nil, err
	}
	const hole = `"content":""`
	i := bytes.Index(b, []byte(hole))
	if i < 0 {
		return nil, fmt.Errorf("chunk template without content: %s", b)
	}
	i += len(hole) - len(`""`)
	t := &tokenEvents{
		prefix: append([]byte("data: "), b[:i]...),
		suffix: append(append([]byte(nil), b[i+2:]...), "\n\n"...),
	}
	t.enc = json.NewEncoder(&t.quoted)
	return t, nil
}

// event queues the event of one token's text; one stream's handler calls
// it, never two goroutines at once.
func (t *tokenEvents) event(out *sse, text string) error {
	t.quoted.Reset()
	if plainJSON(text) {
		// Most tokens: no escaping, no reflection, nothing allocated.
		t.quoted.WriteByte('"')
		t.quoted.WriteString(text)
		t.quoted.WriteByte('"')
		return out.queue(t.prefix, t.quoted.Bytes(), t.suffix)
	}
	if err := t.enc.Encode(text); err != nil {
		return err
	}
	q := t.quoted.Bytes()
	return out.queue(t.prefix, q[:len(q)-1], t.suffix) // Encode ends the value with a newline
}

// plainJSON reports whether encoding/json writes s as itself between
// quotes: printable ASCII, without the quote, the backslash and the
// characters it escapes for HTML (<, >, &).
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}
