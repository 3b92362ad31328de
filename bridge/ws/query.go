package ws

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"html"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// jobSpec describes one client request that runs one or more swarm queries.
type jobSpec struct {
	queryID   string // client's, or empty for a new one
	queryType string // as shown to the client (chat, vision, imagine, speech, tts, stt)
	model     string // the model that will answer (the last step's)
	modelType string // the seed's model_type, kept for its history view
	prompt    string
	// reply is the message that carries the answer: query_result for
	// submit_query, transcription_result for speech_to_text, speech_result
	// for text_to_speech.
	reply string
	// prefer is how the router picks each step's worker (energy.go).
	prefer router.EnergyPreference
	run    func(ctx context.Context, r *jobRun) (*outcome, error)
}

// outcome is what a job produced.
type outcome struct {
	text   string
	media  *pb.Media
	prompt string // what was asked, when it differs from the spec (speech)
	model  string
}

// jobRun is a running job: the steps it has taken so far.
type jobRun struct {
	c       *conn
	id      string
	workers int
	steps   []stepInfo
}

var queryIDRe = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,64}$`)

func newQueryID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// start registers a job and runs it on its own goroutine. A connection
// runs at most maxQueries jobs at once and lets as many more wait; beyond
// that a job is refused with BUSY.
func (c *conn) start(spec jobSpec) {
	id := spec.queryID
	if id != "" && !queryIDRe.MatchString(id) {
		c.sendError("BAD_REQUEST", "query_id must be 1-64 characters of A-Z a-z 0-9 . _ : -", "")
		return
	}
	if id == "" {
		id = newQueryID()
	}
	if !c.s.beginQuery() {
		m := busyMsg("the bridge is shutting down; try again on another", id, c.s.cfg.retryAfter)
		m.Code = "UNAVAILABLE"
		c.send(m)
		return
	}
	ctx, cancel := context.WithTimeout(router.WithEnergyPreference(c.ctx, spec.prefer), c.s.cfg.queryTimeout)
	r := &running{cancel: cancel}
	c.mu.Lock()
	if c.stopping {
		// Counted in just before the server's Close; stopQueries has
		// already taken the queries it stops.
		c.mu.Unlock()
		cancel()
		c.s.endQuery()
		m := busyMsg("the bridge is shutting down; try again on another", id, c.s.cfg.retryAfter)
		m.Code = "UNAVAILABLE"
		c.send(m)
		return
	}
	if _, dup := c.queries[id]; dup {
		c.mu.Unlock()
		cancel()
		c.s.endQuery()
		c.sendError("BAD_REQUEST", fmt.Sprintf("query %q is already running", id), id)
		return
	}
	if len(c.queries) >= 2*c.s.cfg.maxQueries {
		c.mu.Unlock()
		cancel()
		c.s.endQuery()
		c.send(busyMsg(fmt.Sprintf("too many queries on this connection (limit %d running, %d waiting)", c.s.cfg.maxQueries, c.s.cfg.maxQueries), id, c.s.cfg.retryAfter))
		return
	}
	c.queries[id] = r
	// Under c.mu with the query's entry: stopQueries, which waits on
	// wg, then sees every query it has taken counted in.
	c.wg.Add(1)
	c.mu.Unlock()

	workers := max(c.s.catalog().workers, 1) // the seed client divides by it
	c.send(queryStartedMsg{Type: "query_started", QueryID: id, QueryType: spec.queryType, Model: spec.model})
	submitted := time.Now()
	go func() {
		defer c.wg.Done()
		defer c.s.endQuery() // after the answer is queued: Drain waits for it too
		defer cancel()
		jr := &jobRun{c: c, id: id, workers: workers}
		out, err := c.runJob(ctx, jr, spec)
		c.mu.Lock()
		delete(c.queries, id)
		left := len(c.queries)
		c.mu.Unlock()
		if c.ctx.Err() != nil {
			return // the client is gone
		}
		elapsed := time.Since(submitted).Seconds()
		if err != nil {
			c.send(c.jobError(err, id, r))
			c.send(queueUpdateMsg{Type: "queue_update", Depth: left, Total: workers})
			return
		}
		c.reply(spec, jr, out, elapsed)
		c.send(queueUpdateMsg{Type: "queue_update", Depth: left, Total: workers})
	}()
}

// runJob waits for a free slot, then runs the job.
func (c *conn) runJob(ctx context.Context, jr *jobRun, spec jobSpec) (*outcome, error) {
	select {
	case c.sem <- struct{}{}:
	default:
		c.mu.Lock()
		c.waiting++
		depth := c.waiting
		c.mu.Unlock()
		c.send(queueUpdateMsg{Type: "queue_update", Depth: depth, Total: jr.workers, QueryID: jr.id, Queue: "connection"})
		select {
		case c.sem <- struct{}{}:
		case <-ctx.Done():
		}
		c.mu.Lock()
		c.waiting--
		c.mu.Unlock()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	defer func() { <-c.sem }()
	return spec.run(ctx, jr)
}

// jobError is the error message that ends a failed job. Overload is
// always BUSY with a retry hint: the bridge queue's estimate when it
// refused the query, else the configured one.
func (c *conn) jobError(err error, id string, r *running) errorMsg {
	switch {
	case r.userCancelled.Load():
		return errorMsg{Type: "error", Code: "CANCELLED", Message: "query cancelled", QueryID: id}
	case r.stopped.Load():
		return errorMsg{Type: "error", Code: "UNAVAILABLE", Message: "the bridge stopped before the answer; ask again on another", QueryID: id}
	}
	pe := protocol.AsError(err)
	if pe.Code == protocol.CodeBusy {
		retry := c.s.cfg.retryAfter
		var be *queue.BusyError
		if errors.As(err, &be) && be.RetryAfter > 0 {
			retry = be.RetryAfter
		}
		return busyMsg(pe.Message, id, retry)
	}
	return errorMsg{Type: "error", Code: protocol.CodeName(pe.Code), Message: pe.Message, QueryID: id}
}

func (c *conn) reply(spec jobSpec, jr *jobRun, out *outcome, elapsed float64) {
	model := spec.model
	if out.model != "" {
		model = out.model
	}
	// History first: a client that asks for it after query_done sees it.
	prompt := spec.prompt
	if out.prompt != "" {
		prompt = out.prompt
	}
	c.record(historyEntry{
		Prompt:         truncateRunes(prompt, 200),
		QueryType:      html.EscapeString(spec.queryType),
		ModelType:      html.EscapeString(spec.modelType),
		ModelName:      html.EscapeString(model),
		ProcessingTime: elapsed,
		Timestamp:      time.Now().UTC().Format(time.RFC3339),
	}, elapsed, 0)
	switch spec.reply {
	case "transcription_result":
		c.send(textMsg{Type: "transcription_result", Text: out.text, QueryID: jr.id})
	case "speech_result":
		c.send(speechResultMsg{Type: "speech_result", Audio: base64.StdEncoding.EncodeToString(out.media.GetData()), Mime: out.media.GetMime(), QueryID: jr.id})
	default:
		m := queryResultMsg{Type: "query_result", ResultType: "text", ProcessingTime: elapsed, QueryID: jr.id}
		switch {
		case out.media != nil:
			m.Result = base64.StdEncoding.EncodeToString(out.media.GetData())
			m.Mime = out.media.GetMime()
			m.ResultType = "image"
			if strings.HasPrefix(m.Mime, "audio/") {
				m.ResultType = "audio"
			}
		case c.rawText:
			m.Result = out.text
		default:
			m.Result = seedSafe(out.text)
		}
		c.send(m)
	}
	done := queryDoneMsg{Type: "query_done", QueryID: jr.id, ProcessingTime: elapsed, Steps: jr.steps}
	if n := len(jr.steps); n > 0 {
		done.stepInfo = jr.steps[n-1]
	}
	c.send(done)
}

// step runs one swarm query. With stream set, text deltas go to the client
// as query_chunk as they arrive. The answer is bounded: text over maxAnswer
// or more than one piece of media ends the query with TOO_LARGE.
func (jr *jobRun) step(ctx context.Context, t pb.QueryType, model string, stream bool, build func(*pb.QueryRequest)) (string, *pb.Media, error) {
	c := jr.c
	id := make([]byte, protocol.IDLen)
	_, _ = rand.Read(id)
	deadline, _ := ctx.Deadline()
	req := &pb.QueryRequest{Id: id, Type: t, Model: model, DeadlineUnixMs: deadline.UnixMilli()}
	build(req)
	if err := protocol.ValidateRequest(req); err != nil {
		return "", nil, err
	}
	var text strings.Builder
	var media *pb.Media
	var audio protocol.Audio // tts: the Media pieces, joined
	h := func(ev *pb.Event) error {
		if ev == nil {
			// Restart on another worker (see router.WithRestart).
			text.Reset()
			media, audio = nil, protocol.Audio{}
			if stream && !c.send(queryRestartMsg{Type: "query_restart", QueryID: jr.id}) {
				return errClientGone
			}
			return nil
		}
		switch k := ev.GetKind().(type) {
		case *pb.Event_Accepted:
			c.send(queueUpdateMsg{Type: "queue_update", Depth: int(k.Accepted.GetQueuePosition()), Total: jr.workers, QueryID: jr.id, Queue: "worker"})
		case *pb.Event_Chunk:
			s := k.Chunk.GetText()
			if text.Len()+len(s) > c.s.cfg.maxAnswer {
				return protocol.Errorf(protocol.CodeTooLarge, "answer over %d bytes", c.s.cfg.maxAnswer)
			}
			text.WriteString(s)
			if stream && !c.send(queryChunkMsg{Type: "query_chunk", QueryID: jr.id, Text: s}) {
				return errClientGone
			}
		case *pb.Event_Media:
			// Speech may come in pieces, to be joined; the router's output
			// budget bounds their sum.
			joined := t == pb.QueryType_QUERY_TYPE_TTS && audio.Add(k.Media.GetMime(), k.Media.GetData())
			switch {
			case joined:
			case media == nil && t != pb.QueryType_QUERY_TYPE_TTS:
				media = k.Media
			default:
				return protocol.Errorf(protocol.CodeTooLarge, "more than one media result")
			}
		}
		if c.ctx.Err() != nil {
			return errClientGone
		}
		return nil
	}
	// The bridge's queue (when the swarm is the bridge's) serves each user
	// in turn and tells a waiting query its place.
	qc := queue.Client{Key: c.key, Notify: func(p queue.Position) {
		// On the bridge queue's goroutine, which tells every waiting
		// query its place: it must not wait for this client.
		c.sendLatest(queueUpdateMsg{Type: "queue_update", Depth: p.Position, Total: jr.workers, QueryID: jr.id, Queue: "bridge", Waiting: p.Waiting})
	}}
	res, err := c.s.swarm.Query(router.WithRestart(queue.WithClient(ctx, qc)), req, h)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return "", nil, protocol.Errorf(protocol.CodeTimeout, "query took longer than %s", c.s.cfg.queryTimeout)
		}
		return "", nil, err
	}
	jr.steps = append(jr.steps, stepOf(t, model, res))
	if audio.Pieces > 0 {
		media = &pb.Media{Mime: audio.Mime, Data: audio.Data}
	}
	return text.String(), media, nil
}

var errClientGone = errors.New("client gone")

func stepOf(t pb.QueryType, model string, res *router.Result) stepInfo {
	d := res.Done
	si := stepInfo{
		QueryType:        seedTypeName(t),
		Model:            model,
		Local:            res.Local,
		Attempts:         res.Attempts,
		Continued:        res.Continued,
		Writers:          res.ContinuedBy(),
		TTFTMs:           res.TTFTMs,
		TotalMs:          res.TotalMs,
		QueueMs:          d.GetTiming().GetQueueMs(),
		PromptTokens:     d.GetUsage().GetPromptTokens(),
		CompletionTokens: d.GetUsage().GetCompletionTokens(),
		EnergyMJ:         d.GetEnergyMj(),
		WorkerVersion:    d.GetWorkerVersion(),
	}
	if r := d.GetReceipt(); len(r.GetRouterSig()) > 0 {
		si.Receipt, _ = proto.Marshal(r)
	}
	if res.Peer != "" {
		si.Peer = res.PeerString()
	}
	if d.GetModel() != "" {
		si.Model = d.GetModel()
	}
	// Tokens per second over the generation, after the first token.
	if n := si.CompletionTokens; n > 1 && si.TotalMs > si.TTFTMs {
		si.TokensPerSec = float64(n-1) / (float64(si.TotalMs-si.TTFTMs) / 1000)
	} else if n > 0 && si.TotalMs > 0 {
		si.TokensPerSec = float64(n) / (float64(si.TotalMs) / 1000)
	}
	return si
}

// fenceRe is the seed client's code-fence pattern: it escapes what is inside
// a fence and puts everything else into innerHTML as it is.
var fenceRe = regexp.MustCompile("```(\\w+)?\\n([\\s\\S]*?)```")

// seedSafe escapes a text answer for the seed client, which renders answers
// with innerHTML: text outside code fences is HTML-escaped (the browser then
// shows it as written), fenced code is left for the client to escape. A
// model's <img onerror=...> thus never runs in that client.
func seedSafe(s string) string {
	if !strings.ContainsAny(s, "<>&") {
		return s
	}
	var b strings.Builder
	last := 0
	for _, m := range fenceRe.FindAllStringIndex(s, -1) {
		b.WriteString(escapeText(s[last:m[0]]))
		b.WriteString(s[m[0]:m[1]])
		last = m[1]
	}
	b.WriteString(escapeText(s[last:]))
	return b.String()
}

var textEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;")

func escapeText(s string) string { return textEscaper.Replace(s) }

func truncateRunes(s string, n int) string {
	i := 0
	for j := range s {
		if i == n {
			return s[:j] + "…"
		}
		i++
	}
	return s
}

// decodeMedia decodes base64 (padded or not, optionally a data: URL) and
// checks the content's type. want is a MIME prefix ("image/" or "audio/").
func decodeMedia(s, want, what string) (string, []byte, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "data:") {
		if i := strings.Index(s, ","); i >= 0 {
			s = s[i+1:]
		}
	}
	if s == "" {
		return "", nil, protocol.Errorf(protocol.CodeBadRequest, "%s is empty", what)
	}
	data, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		data, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
	}
	if err != nil {
		return "", nil, protocol.Errorf(protocol.CodeBadRequest, "%s is not valid base64", what)
	}
	mime := http.DetectContentType(data)
	if i := strings.IndexByte(mime, ';'); i >= 0 {
		mime = mime[:i]
	}
	switch want {
	case "image/":
		if !strings.HasPrefix(mime, "image/") {
			return "", nil, protocol.Errorf(protocol.CodeBadRequest, "%s is not an image (looks like %s)", what, mime)
		}
	case "audio/":
		// The seed records audio/webm, which sniffs as video/webm.
		switch {
		case strings.HasPrefix(mime, "audio/"):
		case mime == "application/ogg":
			mime = "audio/ogg"
		default:
			mime = "audio/webm"
		}
	}
	return mime, data, nil
}

const maxHistory = 64

// historyMessages converts an optional earlier conversation.
func historyMessages(h []turn) ([]*pb.Message, error) {
	if len(h) > maxHistory {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "history has %d messages, limit %d", len(h), maxHistory)
	}
	out := make([]*pb.Message, 0, len(h)+1)
	for i, t := range h {
		switch t.Role {
		case "user", "assistant", "system":
		default:
			return nil, protocol.Errorf(protocol.CodeBadRequest, "history[%d]: role must be user, assistant or system", i)
		}
		out = append(out, &pb.Message{Role: t.Role, Content: t.Content})
	}
	return out, nil
}

// submit handles submit_query.
func (c *conn) submit(m *inbound) {
	q := m.Query
	if q == nil {
		c.sendError("BAD_REQUEST", "submit_query needs a query object", "")
		return
	}
	qt := strings.ToLower(strings.TrimSpace(q.QueryType))
	if qt == "" {
		qt = "chat"
	}
	fail := func(err error) {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
	}
	hist, err := historyMessages(q.History)
	if err != nil {
		fail(err)
		return
	}
	prefer, ok := c.preference("query.prefer", q.Prefer, m.QueryID)
	if !ok {
		return
	}
	cat := c.s.catalog()
	spec := jobSpec{queryID: m.QueryID, queryType: qt, modelType: q.ModelType, prompt: q.Prompt, reply: "query_result", prefer: prefer}
	if qt == "speech" && strings.TrimSpace(q.Audio) == "" && strings.TrimSpace(q.Prompt) != "" {
		qt = "chat" // a speech query already transcribed: answer its text
	}
	switch qt {
	case "speech":
		c.startSpeech(&spec, cat, q, hist, fail)
		return
	case "vision":
		if strings.TrimSpace(q.Image) == "" {
			c.sendError("BAD_REQUEST", "vision query needs an image: send it in vision_chunk messages or as query.image", m.QueryID)
			return
		}
		mime, img, err := decodeMedia(q.Image, "image/", "image")
		if err != nil {
			fail(err)
			return
		}
		c.startVision(spec, cat, q.ModelName, q.Prompt, mime, img, hist)
		return
	}
	t, err := protocol.ParseType(qt)
	if err != nil {
		c.sendError("BAD_REQUEST", fmt.Sprintf("unknown query_type %q (want chat, vision, imagine, speech, tts or stt)", q.QueryType), m.QueryID)
		return
	}
	if t == pb.QueryType_QUERY_TYPE_EMBED {
		c.sendError("BAD_REQUEST", "embeddings are served by POST /v1/embeddings, not over the WebSocket", m.QueryID)
		return
	}
	spec.queryType = seedTypeName(t)
	if t == pb.QueryType_QUERY_TYPE_STT {
		spec.queryType = "stt"
	}
	model, err := cat.resolve(q.ModelName, t)
	if err != nil {
		fail(err)
		return
	}
	spec.model = model
	var audio []byte
	var audioMime string
	if t == pb.QueryType_QUERY_TYPE_STT {
		if audioMime, audio, err = decodeMedia(q.Audio, "audio/", "audio"); err != nil {
			fail(err)
			return
		}
	}
	prompt := q.Prompt
	speakAnswer := q.ModelType == "speech" && t == pb.QueryType_QUERY_TYPE_CHAT
	spec.run = func(ctx context.Context, jr *jobRun) (*outcome, error) {
		text, media, err := jr.step(ctx, t, model, true, func(r *pb.QueryRequest) {
			switch t {
			case pb.QueryType_QUERY_TYPE_CHAT:
				r.Messages = append(slices.Clip(hist), &pb.Message{Role: "user", Content: prompt})
			case pb.QueryType_QUERY_TYPE_STT:
				r.Attachments = []*pb.Attachment{{Mime: audioMime, Data: audio}}
			default:
				r.Prompt = prompt
			}
		})
		if err != nil {
			return nil, err
		}
		out := &outcome{text: text, media: media}
		if speakAnswer {
			jr.speak(ctx, out)
		}
		return out, nil
	}
	c.start(spec)
}

// speak turns a text answer into audio when the seed asks for spoken
// answers (model_type "speech") and a text-to-speech model is around;
// without one the answer stays text.
func (jr *jobRun) speak(ctx context.Context, out *outcome) {
	if out.media != nil || strings.TrimSpace(out.text) == "" {
		return
	}
	model, err := jr.c.s.catalog().resolve("", pb.QueryType_QUERY_TYPE_TTS)
	if err != nil {
		return
	}
	_, media, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_TTS, model, false, func(r *pb.QueryRequest) { r.Prompt = out.text })
	if err == nil && media != nil {
		out.media = media
	}
}

// startSpeech handles the seed's speech query: transcribe the recording on a
// speech-to-text peer, then answer the text as chat.
func (c *conn) startSpeech(spec *jobSpec, cat *catalog, q *queryIn, hist []*pb.Message, fail func(error)) {
	mime, audio, err := decodeMedia(q.Audio, "audio/", "audio")
	if err != nil {
		fail(err)
		return
	}
	sttModel, err := cat.resolve(q.ModelName, pb.QueryType_QUERY_TYPE_STT)
	if err != nil {
		fail(err)
		return
	}
	chatModel, err := cat.resolve(q.ModelName, pb.QueryType_QUERY_TYPE_CHAT)
	if err != nil {
		fail(err)
		return
	}
	spec.model = chatModel
	speakAnswer := q.ModelType == "speech"
	spec.run = func(ctx context.Context, jr *jobRun) (*outcome, error) {
		transcript, _, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_STT, sttModel, false, func(r *pb.QueryRequest) {
			r.Attachments = []*pb.Attachment{{Mime: mime, Data: audio}}
		})
		if err != nil {
			return nil, err
		}
		transcript = strings.TrimSpace(transcript)
		if transcript == "" {
			return nil, protocol.Errorf(protocol.CodeBadRequest, "no speech recognised in the recording")
		}
		jr.c.send(queryTranscriptMsg{Type: "query_transcript", QueryID: jr.id, Text: transcript})
		text, _, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_CHAT, chatModel, true, func(r *pb.QueryRequest) {
			r.Messages = append(slices.Clip(hist), &pb.Message{Role: "user", Content: transcript})
		})
		if err != nil {
			return nil, err
		}
		out := &outcome{text: text, prompt: transcript}
		if speakAnswer {
			jr.speak(ctx, out)
		}
		return out, nil
	}
	c.start(*spec)
}

// startVision runs a vision query on a reassembled or inline image.
func (c *conn) startVision(spec jobSpec, cat *catalog, modelName, prompt, mime string, img []byte, hist []*pb.Message) {
	model, err := cat.resolve(modelName, pb.QueryType_QUERY_TYPE_VISION)
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, spec.queryID)
		return
	}
	spec.queryType, spec.model, spec.prompt, spec.reply = "vision", model, prompt, "query_result"
	spec.run = func(ctx context.Context, jr *jobRun) (*outcome, error) {
		text, media, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_VISION, model, true, func(r *pb.QueryRequest) {
			r.Messages = append(slices.Clip(hist), &pb.Message{Role: "user", Content: prompt, Attachments: []*pb.Attachment{{Mime: mime, Data: img}}})
		})
		if err != nil {
			return nil, err
		}
		out := &outcome{text: text, media: media}
		if spec.modelType == "speech" {
			jr.speak(ctx, out)
		}
		return out, nil
	}
	c.start(spec)
}

// visionChunk handles one piece of a chunked vision image.
func (c *conn) visionChunk(m *inbound) {
	if m.ChunkID == nil || m.TotalChunks == nil {
		c.sendError("BAD_REQUEST", "vision_chunk needs chunk_id and total_chunks", "")
		return
	}
	id := string(m.ImageID)
	whole, done, err := c.uploads.add(id, *m.ChunkID, *m.TotalChunks, m.ChunkData)
	if err != nil {
		c.sendError("BAD_REQUEST", err.Error(), "")
		return
	}
	if !done {
		c.send(messageMsg{Type: "vision_chunk_received", Message: "Chunk received", ImageID: id})
		return
	}
	mime, img, err := decodeMedia(whole, "image/", "image")
	whole = ""
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
		return
	}
	hist, err := historyMessages(m.History)
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
		return
	}
	prefer, ok := c.preference("prefer", m.Prefer, m.QueryID)
	if !ok {
		return
	}
	c.send(messageMsg{Type: "vision_upload_complete", Message: "Image upload complete and processed", ImageID: id})
	spec := jobSpec{queryID: m.QueryID, modelType: m.ModelType, prefer: prefer}
	c.startVision(spec, c.s.catalog(), m.ModelName, m.Prompt, mime, img, hist)
}

// speechToText handles the seed's speech_to_text: transcription only.
func (c *conn) speechToText(m *inbound) {
	mime, audio, err := decodeMedia(m.Audio, "audio/", "audio")
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
		return
	}
	model, err := c.s.catalog().resolve(m.ModelName, pb.QueryType_QUERY_TYPE_STT)
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
		return
	}
	prefer, ok := c.preference("prefer", m.Prefer, m.QueryID)
	if !ok {
		return
	}
	c.start(jobSpec{queryID: m.QueryID, queryType: "stt", model: model, prompt: "(speech to text)", reply: "transcription_result", prefer: prefer,
		run: func(ctx context.Context, jr *jobRun) (*outcome, error) {
			text, _, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_STT, model, false, func(r *pb.QueryRequest) {
				r.Attachments = []*pb.Attachment{{Mime: mime, Data: audio}}
			})
			if err != nil {
				return nil, err
			}
			return &outcome{text: strings.TrimSpace(text)}, nil
		}})
}

// textToSpeech handles the seed's text_to_speech.
func (c *conn) textToSpeech(m *inbound) {
	if strings.TrimSpace(m.Text) == "" {
		c.sendError("BAD_REQUEST", "text_to_speech needs text", m.QueryID)
		return
	}
	model, err := c.s.catalog().resolve(m.ModelName, pb.QueryType_QUERY_TYPE_TTS)
	if err != nil {
		pe := protocol.AsError(err)
		c.sendError(protocol.CodeName(pe.Code), pe.Message, m.QueryID)
		return
	}
	prefer, ok := c.preference("prefer", m.Prefer, m.QueryID)
	if !ok {
		return
	}
	text := m.Text
	c.start(jobSpec{queryID: m.QueryID, queryType: "tts", model: model, prompt: text, reply: "speech_result", prefer: prefer,
		run: func(ctx context.Context, jr *jobRun) (*outcome, error) {
			_, media, err := jr.step(ctx, pb.QueryType_QUERY_TYPE_TTS, model, false, func(r *pb.QueryRequest) { r.Prompt = text })
			if err != nil {
				return nil, err
			}
			if media == nil {
				return nil, protocol.Errorf(protocol.CodeBackendError, "the worker returned no audio")
			}
			return &outcome{media: media}, nil
		}})
}

// preference parses a message's field (named for the error) holding a
// routing preference; a bad value is answered BAD_REQUEST and ok is false.
func (c *conn) preference(field, v, queryID string) (p router.EnergyPreference, ok bool) {
	p, err := router.ParseEnergyPreference(v)
	if err != nil {
		c.sendError("BAD_REQUEST", field+": "+err.Error(), queryID)
		return p, false
	}
	return p, true
}

// cancelQuery cancels one of this connection's queries at the worker.
func (c *conn) cancelQuery(id string) {
	c.mu.Lock()
	r, ok := c.queries[id]
	c.mu.Unlock()
	if !ok {
		c.sendError("BAD_REQUEST", fmt.Sprintf("no running query %q", id), id)
		return
	}
	r.userCancelled.Store(true)
	r.cancel()
}
