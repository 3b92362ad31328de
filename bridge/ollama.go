package bridge

import (
	"cmp"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// ollamaVersion is the Ollama API version the bridge speaks; clients that
// check it want a recent one.
const ollamaVersion = "0.12.0"

// mountOllama serves Ollama's native API under /api/ from the swarm, with
// the keys, CORS and limits of the OpenAI API, so that a program set up
// for http://localhost:11434 works against a bridge by changing the host.
func (s *Server) mountOllama(mux *http.ServeMux) {
	api := http.NewServeMux()
	api.HandleFunc("GET /api/version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"version": ollamaVersion})
	})
	api.HandleFunc("GET /api/tags", s.handleOllamaTags)
	api.HandleFunc("GET /api/ps", s.handleOllamaPS)
	api.HandleFunc("POST /api/show", s.handleOllamaShow)
	api.HandleFunc("POST /api/chat", s.handleOllamaChat)
	api.HandleFunc("POST /api/generate", s.handleOllamaGenerate)
	api.HandleFunc("POST /api/embed", s.handleOllamaEmbed)
	api.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		ollamaError(w, &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("%s %s is not served by an mtor bridge", r.Method, r.URL.Path)})
	})
	mux.Handle("/api/", s.api(api, ollamaError))
}

// ollamaError writes Ollama's error shape: {"error": "..."}.
func ollamaError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", fmt.Sprint(int(math.Ceil(e.RetryAfter.Seconds()))))
	}
	if e.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="mtor"`)
	}
	writeJSON(w, e.Status, map[string]string{"error": e.Message})
}

type ollamaDetails struct {
	ParentModel       string   `json:"parent_model"`
	Format            string   `json:"format"`
	Family            string   `json:"family"`
	Families          []string `json:"families"`
	ParameterSize     string   `json:"parameter_size"`
	QuantizationLevel string   `json:"quantization_level"`
}

type ollamaModel struct {
	Name       string        `json:"name"`
	Model      string        `json:"model"`
	ModifiedAt time.Time     `json:"modified_at,omitzero"`
	ExpiresAt  time.Time     `json:"expires_at,omitzero"`
	Size       int64         `json:"size"`
	SizeVRAM   *int64        `json:"size_vram,omitempty"`
	Digest     string        `json:"digest"`
	Details    ollamaDetails `json:"details"`
}

// ollamaModels are the swarm's models Ollama's API can use: chat, vision
// and embed.
func (s *Server) ollamaModels(running bool) []ollamaModel {
	out := []ollamaModel{}
	for _, m := range s.swarm.Models() {
		if !slices.ContainsFunc(m.Types, func(t string) bool { return t == "chat" || t == "vision" || t == "embed" }) {
			continue
		}
		om := ollamaModel{Name: m.Name, Model: m.Name, ModifiedAt: s.started, Details: ollamaDetails{Format: "mtor", Families: []string{}}}
		if running {
			var zero int64
			om.ModifiedAt, om.ExpiresAt, om.SizeVRAM = time.Time{}, time.Now().Add(24*time.Hour), &zero
		}
		out = append(out, om)
	}
	return out
}

func (s *Server) handleOllamaTags(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"models": s.ollamaModels(false)})
}

// handleOllamaPS lists the models peers serve now: in a swarm they are
// all loaded somewhere.
func (s *Server) handleOllamaPS(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"models": s.ollamaModels(true)})
}

// ollamaCapabilities are Ollama's names for what the swarm serves of m.
func ollamaCapabilities(types, features []string) []string {
	caps := []string{}
	if slices.Contains(types, "chat") {
		caps = append(caps, "completion")
	}
	if slices.Contains(types, "vision") {
		caps = append(caps, "vision")
	}
	if slices.Contains(types, "embed") {
		caps = append(caps, "embedding")
	}
	if slices.Contains(features, protocol.FeatureTools) {
		caps = append(caps, "tools")
	}
	return caps
}

func (s *Server) handleOllamaShow(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model string `json:"model"`
		Name  string `json:"name"` // the older name of the field
	}
	if err := s.decodeOllama(w, r, &req); err != nil {
		ollamaError(w, err)
		return
	}
	name := s.ollamaName(cmp.Or(req.Model, req.Name))
	m, ok := s.model(name)
	if !ok {
		ollamaError(w, ollamaNotFound(name))
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"modelfile": "", "parameters": "", "template": "",
		"details":      ollamaDetails{Format: "mtor", Families: []string{}},
		"model_info":   map[string]any{"mtor.peers": m.Peers},
		"capabilities": ollamaCapabilities(m.Types, m.Features),
		"modified_at":  s.started,
	})
}

// ollamaNotFound is Ollama's 404 for a model the swarm does not serve.
func ollamaNotFound(name string) *apiError {
	return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("model '%s' not found", name)}
}

// ollamaOptions are the model options the swarm can honour; any other
// option gets a 400 rather than being ignored.
type ollamaOptions struct {
	Temperature      *float64 `json:"temperature"`
	TopP             *float64 `json:"top_p"`
	Seed             *int64   `json:"seed"`
	NumPredict       *int64   `json:"num_predict"`
	Stop             []string `json:"stop"`
	PresencePenalty  *float64 `json:"presence_penalty"`
	FrequencyPenalty *float64 `json:"frequency_penalty"`
}

// ollamaKnownOptions are options accepted and ignored: they tune how one
// server runs a model, which the swarm decides per worker.
var ollamaKnownOptions = []string{"num_ctx", "num_gpu", "num_thread", "num_batch", "main_gpu", "use_mmap", "use_mlock", "numa", "low_vram", "num_keep"}

func (o *ollamaOptions) params(raw map[string]json.RawMessage) (*pb.Params, *apiError) {
	for k := range raw {
		switch k {
		case "temperature", "top_p", "seed", "num_predict", "stop", "presence_penalty", "frequency_penalty":
		default:
			if !slices.Contains(ollamaKnownOptions, k) {
				return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("option %q is not supported by an mtor bridge", k)}
			}
		}
	}
	req := &chatRequest{Temperature: o.Temperature, TopP: o.TopP, Seed: o.Seed, PresencePenalty: o.PresencePenalty, FrequencyPenalty: o.FrequencyPenalty}
	if o.NumPredict != nil && *o.NumPredict > 0 {
		req.MaxTokens = o.NumPredict
	}
	if len(o.Stop) > 0 {
		b, _ := json.Marshal(o.Stop)
		req.Stop = b
	}
	return chatParams(req)
}

type ollamaToolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     *int            `json:"index,omitempty"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

type ollamaMessage struct {
	Role      string           `json:"role"`
	Content   string           `json:"content"`
	Images    []string         `json:"images,omitempty"`
	ToolCalls []ollamaToolCall `json:"tool_calls,omitempty"`
	ToolName  string           `json:"tool_name,omitempty"`
	Thinking  string           `json:"thinking,omitempty"`
}

type ollamaChatRequest struct {
	Model     string                     `json:"model"`
	Messages  []ollamaMessage            `json:"messages"`
	Tools     []chatTool                 `json:"tools"`
	Format    json.RawMessage            `json:"format"`
	Options   map[string]json.RawMessage `json:"options"`
	Stream    *bool                      `json:"stream"`
	KeepAlive json.RawMessage            `json:"keep_alive"`
	Think     json.RawMessage            `json:"think"`
}

// ollamaFormat maps Ollama's format: "json" or a JSON schema object.
func ollamaFormat(raw json.RawMessage) (*pb.ResponseFormat, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "":
			return nil, nil
		case "json":
			return &pb.ResponseFormat{Type: "json_object"}, nil
		}
		return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("invalid format %q: want \"json\" or a JSON schema", s)}
	}
	var obj map[string]any
	if json.Unmarshal(raw, &obj) != nil {
		return nil, &apiError{Status: http.StatusBadRequest, Message: "invalid format: want \"json\" or a JSON schema object"}
	}
	return &pb.ResponseFormat{Type: "json_schema", Name: "format", Schema: compact(raw)}, nil
}

// toOllamaErr turns an OpenAI-shaped error into the message Ollama's
// clients show.
func toOllamaErr(e *apiError) *apiError {
	if e == nil {
		return nil
	}
	c := *e
	if c.Param != "" && !strings.Contains(c.Message, c.Param) {
		c.Message = c.Param + ": " + c.Message
	}
	return &c
}

func (s *Server) ollamaChatQuery(req *ollamaChatRequest) (*pb.QueryRequest, *apiError) {
	if !isNull(req.Think) && string(req.Think) != "false" {
		return nil, &apiError{Status: http.StatusBadRequest, Message: "think is not supported by an mtor bridge"}
	}
	cr := &chatRequest{Model: req.Model, Tools: req.Tools}
	var media int64
	q := &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: req.Model}
	if strings.TrimSpace(req.Model) == "" {
		return nil, &apiError{Status: http.StatusBadRequest, Message: "model is required"}
	}
	if len(req.Messages) > protocol.MaxMessages {
		return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("%d messages, limit %d", len(req.Messages), protocol.MaxMessages)}
	}
	// The calls not answered yet, in order: Ollama's tool messages name
	// the function, not the call, and OpenAI-compatible servers need the
	// call's id on the answer (tool_call_id).
	var open []*pb.ToolCall
	for i, m := range req.Messages {
		switch m.Role {
		case "system", "user", "assistant", "tool":
		default:
			return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("messages[%d]: invalid role %q", i, m.Role)}
		}
		pm := &pb.Message{Role: m.Role, Content: m.Content, Name: m.ToolName}
		if m.Role == "tool" {
			if k := slices.IndexFunc(open, func(c *pb.ToolCall) bool { return m.ToolName == "" || c.Name == m.ToolName }); k >= 0 {
				pm.ToolCallId = open[k].Id
				open = slices.Delete(open, k, k+1)
			}
		}
		if len(m.Images) > protocol.MaxAttachments {
			return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("messages[%d]: %d images, limit %d", i, len(m.Images), protocol.MaxAttachments)}
		}
		for _, img := range m.Images {
			data, err := decodeBase64(img)
			if err != nil || len(data) == 0 {
				return nil, &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("messages[%d]: an image is not valid base64", i)}
			}
			media += int64(len(data))
			if media > s.cfg.maxMedia {
				return nil, tooLarge("", "images exceed the media limit of %d bytes", s.cfg.maxMedia)
			}
			pm.Attachments = append(pm.Attachments, &pb.Attachment{Mime: http.DetectContentType(data), Data: data})
			q.Type = pb.QueryType_QUERY_TYPE_VISION
		}
		for j, c := range m.ToolCalls {
			args := string(c.Function.Arguments)
			if isNull(c.Function.Arguments) {
				args = "{}"
			}
			// Ollama's calls have no ids; the protocol needs one per call.
			pm.ToolCalls = append(pm.ToolCalls, &pb.ToolCall{Id: cmp.Or(c.ID, fmt.Sprintf("call_%d_%d", i, j)), Name: c.Function.Name, Arguments: compact(json.RawMessage(args))})
		}
		if len(pm.ToolCalls) > 0 {
			open = slices.Clone(pm.ToolCalls)
		}
		q.Messages = append(q.Messages, pm)
	}
	for _, m := range q.Messages {
		for _, a := range m.Attachments {
			if !strings.HasPrefix(a.Mime, "image/") {
				return nil, &apiError{Status: http.StatusBadRequest, Message: "images must be PNG, JPEG, GIF or WebP"}
			}
		}
	}
	var o ollamaOptions
	if len(req.Options) > 0 {
		b, _ := json.Marshal(req.Options)
		if err := json.Unmarshal(b, &o); err != nil {
			return nil, &apiError{Status: http.StatusBadRequest, Message: "invalid options: " + err.Error()}
		}
	}
	p, aerr := o.params(req.Options)
	if aerr != nil {
		return nil, toOllamaErr(aerr)
	}
	q.Params = p
	if err := chatTools(cr, q); err != nil {
		return nil, toOllamaErr(err)
	}
	f, aerr := ollamaFormat(req.Format)
	if aerr != nil {
		return nil, aerr
	}
	q.ResponseFormat = f
	if err := protocol.ValidateRequest(q); err != nil {
		return nil, &apiError{Status: http.StatusBadRequest, Message: protocol.AsError(err).Message}
	}
	return q, nil
}

// ndjson streams Ollama's newline-delimited JSON, sending headers with the
// first line so that a query refused before any output keeps its status.
type ndjson struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
}

func (n *ndjson) line(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.started {
		n.started = true
		n.w.Header().Set("Content-Type", "application/x-ndjson")
		n.w.WriteHeader(http.StatusOK)
	}
	_ = n.rc.SetWriteDeadline(time.Now().Add(defaultWriteTimeout))
	if _, err := n.w.Write(append(b, '\n')); err != nil {
		return err
	}
	return n.rc.Flush()
}

// ollamaDone is the last line's statistics.
func ollamaDone(d *pb.Done, reason string) map[string]any {
	ns := func(ms uint32) int64 { return int64(ms) * int64(time.Millisecond) }
	t := d.GetTiming()
	return map[string]any{
		"done": true, "done_reason": reason,
		"total_duration": ns(t.GetTotalMs()), "load_duration": 0,
		"prompt_eval_count": d.GetUsage().GetPromptTokens(), "prompt_eval_duration": ns(t.GetTtftMs() - min(t.GetTtftMs(), t.GetQueueMs())),
		"eval_count": d.GetUsage().GetCompletionTokens(), "eval_duration": ns(t.GetTotalMs() - min(t.GetTotalMs(), t.GetTtftMs())),
	}
}

// ollamaCalls turns merged tool calls into Ollama's, arguments as objects.
func ollamaCalls(calls []*chatToolCall) []ollamaToolCall {
	var out []ollamaToolCall
	for i, c := range calls {
		var oc ollamaToolCall
		oc.ID = c.ID
		idx := i
		oc.Function.Index, oc.Function.Name = &idx, c.Function.Name
		oc.Function.Arguments = json.RawMessage(c.Function.Arguments)
		if !json.Valid(oc.Function.Arguments) {
			b, _ := json.Marshal(map[string]string{"_raw": c.Function.Arguments})
			oc.Function.Arguments = b
		}
		out = append(out, oc)
	}
	return out
}

// runOllama runs q and answers in Ollama's shape: NDJSON lines of text
// while streaming, tool calls whole (Ollama sends them complete), then the
// done line; or one object. field is "message" for /api/chat and
// "response" for /api/generate.
func (s *Server) runOllama(w http.ResponseWriter, r *http.Request, q *pb.QueryRequest, stream, chat bool) {
	created := func() string { return time.Now().UTC().Format(time.RFC3339Nano) }
	body := func(text string, calls []*chatToolCall) map[string]any {
		o := map[string]any{"model": q.GetModel(), "created_at": created(), "done": false}
		if chat {
			msg := map[string]any{"role": "assistant", "content": text}
			if len(calls) > 0 {
				msg["tool_calls"] = ollamaCalls(calls)
			}
			o["message"] = msg
		} else {
			o["response"] = text
		}
		return o
	}
	finish := func(res *router.Result, ans *answer) map[string]any {
		o := body("", nil)
		if ans != nil {
			o = body(ans.text.String(), ans.calls)
		}
		reason := res.Done.GetFinishReason()
		if reason == "" || reason == protocol.FinishToolCalls {
			reason = protocol.FinishStop // Ollama says stop for tool calls too
		}
		for k, v := range ollamaDone(res.Done, reason) {
			o[k] = v
		}
		return o
	}
	if !stream {
		ans := answer{max: s.cfg.maxAnswer}
		var overflow *apiError
		res, aerr := s.queryWhole(r.Context(), q, ans.reset, func(ev *pb.Event) error {
			if !ans.add(ev, false) {
				overflow = responseTooLarge(s.cfg.maxAnswer, "; stream it")
				return overflow
			}
			return nil
		})
		if overflow != nil {
			aerr = overflow
		}
		if aerr != nil {
			ollamaError(w, toOllamaErr(aerr))
			return
		}
		writeJSON(w, http.StatusOK, finish(res, &ans))
		return
	}
	out := &ndjson{w: w, rc: http.NewResponseController(w)}
	calls := answer{max: s.cfg.maxAnswer}
	// The router reports a handler's error as the client gone; the
	// overflow is kept apart to be reported as what it is.
	var overflow *apiError
	res, aerr := s.query(r.Context(), q, func(ev *pb.Event) error {
		switch k := ev.GetKind().(type) {
		case *pb.Event_Chunk:
			if k.Chunk.GetText() == "" {
				return nil
			}
			return out.line(body(k.Chunk.GetText(), nil))
		case *pb.Event_ToolCall:
			if !calls.add(ev, false) {
				overflow = responseTooLarge(s.cfg.maxAnswer, "")
				return overflow
			}
		}
		return nil
	})
	if overflow != nil {
		aerr = overflow
	}
	if aerr != nil {
		if !out.started {
			ollamaError(w, toOllamaErr(aerr))
			return
		}
		if aerr.Status != statusClientClosed {
			_ = out.line(map[string]string{"error": aerr.Message})
		}
		return
	}
	if len(calls.calls) > 0 {
		if err := out.line(body("", calls.calls)); err != nil {
			return
		}
	}
	_ = out.line(finish(res, nil))
}

func (s *Server) handleOllamaChat(w http.ResponseWriter, r *http.Request) {
	var req ollamaChatRequest
	if err := s.decodeOllama(w, r, &req); err != nil {
		ollamaError(w, err)
		return
	}
	req.Model = s.ollamaName(req.Model)
	if len(req.Messages) == 0 {
		// Ollama loads the model for an empty conversation (clients send
		// one to preload it); in a swarm the peers have it loaded.
		if aerr := s.ollamaKnown(req.Model); aerr != nil {
			ollamaError(w, aerr)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"model": req.Model, "created_at": time.Now().UTC(), "message": map[string]string{"role": "assistant", "content": ""}, "done": true, "done_reason": "load"})
		return
	}
	q, aerr := s.ollamaChatQuery(&req)
	if aerr == nil {
		aerr = s.ollamaCheck(q)
	}
	if aerr != nil {
		ollamaError(w, aerr)
		return
	}
	s.runOllama(w, r, q, req.Stream == nil || *req.Stream, true)
}

// ollamaKnown is Ollama's 404 for a model the swarm does not serve, for
// a preload (an empty conversation), which any model answers whatever
// its types.
func (s *Server) ollamaKnown(name string) *apiError {
	if _, ok := s.model(name); !ok {
		return ollamaNotFound(name)
	}
	return nil
}

// ollamaCheck is the model and feature check in Ollama's words.
func (s *Server) ollamaCheck(q *pb.QueryRequest) *apiError {
	if err := s.checkModel(q.Model, q.Type); err != nil {
		if err.Status == http.StatusNotFound {
			return ollamaNotFound(q.Model)
		}
		return toOllamaErr(err)
	}
	if err := s.checkFeatures(q); err != nil {
		return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf("%s does not support %s", q.Model, err.Param)}
	}
	return nil
}

type ollamaGenerateRequest struct {
	Model     string                     `json:"model"`
	Prompt    string                     `json:"prompt"`
	System    string                     `json:"system"`
	Images    []string                   `json:"images"`
	Format    json.RawMessage            `json:"format"`
	Options   map[string]json.RawMessage `json:"options"`
	Stream    *bool                      `json:"stream"`
	KeepAlive json.RawMessage            `json:"keep_alive"`
	// Not honoured by the swarm: 400 when set.
	Suffix   string          `json:"suffix"`
	Template string          `json:"template"`
	Raw      bool            `json:"raw"`
	Context  json.RawMessage `json:"context"`
	Think    json.RawMessage `json:"think"`
}

func (s *Server) handleOllamaGenerate(w http.ResponseWriter, r *http.Request) {
	var req ollamaGenerateRequest
	if err := s.decodeOllama(w, r, &req); err != nil {
		ollamaError(w, err)
		return
	}
	req.Model = s.ollamaName(req.Model)
	switch {
	case req.Suffix != "" || req.Template != "" || req.Raw || !isNull(req.Context):
		ollamaError(w, &apiError{Status: http.StatusBadRequest, Message: "suffix, template, raw and context are not supported by an mtor bridge; use /api/chat"})
		return
	case strings.TrimSpace(req.Prompt) == "" && len(req.Images) == 0:
		// Ollama loads the model for an empty prompt, one it has.
		if aerr := s.ollamaKnown(req.Model); aerr != nil {
			ollamaError(w, aerr)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"model": req.Model, "created_at": time.Now().UTC(), "response": "", "done": true, "done_reason": "load"})
		return
	}
	cr := ollamaChatRequest{Model: req.Model, Format: req.Format, Options: req.Options, Stream: req.Stream, Think: req.Think}
	if req.System != "" {
		cr.Messages = append(cr.Messages, ollamaMessage{Role: "system", Content: req.System})
	}
	cr.Messages = append(cr.Messages, ollamaMessage{Role: "user", Content: req.Prompt, Images: req.Images})
	q, aerr := s.ollamaChatQuery(&cr)
	if aerr == nil {
		aerr = s.ollamaCheck(q)
	}
	if aerr != nil {
		ollamaError(w, aerr)
		return
	}
	s.runOllama(w, r, q, req.Stream == nil || *req.Stream, false)
}

func (s *Server) handleOllamaEmbed(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model      string                     `json:"model"`
		Input      json.RawMessage            `json:"input"`
		Truncate   *bool                      `json:"truncate"`
		Dimensions *int64                     `json:"dimensions"`
		Options    map[string]json.RawMessage `json:"options"`
		KeepAlive  json.RawMessage            `json:"keep_alive"`
	}
	if err := s.decodeOllama(w, r, &req); err != nil {
		ollamaError(w, err)
		return
	}
	req.Model = s.ollamaName(req.Model)
	if req.Dimensions != nil {
		ollamaError(w, &apiError{Status: http.StatusBadRequest, Message: "dimensions is not supported by an mtor bridge"})
		return
	}
	q, aerr := embedToQuery(&embeddingsRequest{Model: req.Model, Input: req.Input})
	if aerr == nil {
		aerr = s.ollamaCheck(q)
	}
	if aerr != nil {
		ollamaError(w, toOllamaErr(aerr))
		return
	}
	vecs := make([][]float32, len(q.Inputs))
	res, aerr := s.queryWhole(r.Context(), q, func() { clear(vecs) }, func(ev *pb.Event) error {
		if e := ev.GetEmbedding(); e != nil && int(e.GetIndex()) < len(vecs) {
			vecs[e.GetIndex()] = e.GetVector()
		}
		return nil
	})
	if aerr != nil {
		ollamaError(w, toOllamaErr(aerr))
		return
	}
	for i, v := range vecs {
		if v == nil {
			ollamaError(w, &apiError{Status: http.StatusBadGateway, Message: fmt.Sprintf("the worker returned no embedding for input %d", i)})
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"model": q.Model, "embeddings": vecs,
		"total_duration":    int64(res.TotalMs) * int64(time.Millisecond),
		"load_duration":     0,
		"prompt_eval_count": res.Done.GetUsage().GetPromptTokens()})
}

// decodeBase64 decodes an Ollama image: standard base64, padded or not.
func decodeBase64(s string) ([]byte, error) {
	if strings.HasSuffix(s, "=") || len(s)%4 == 0 {
		return base64.StdEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// ollamaName is the swarm's name for an Ollama model name: Ollama takes
// "m" and "m:latest" for one model, so a client may send either whatever
// the worker announced.
func (s *Server) ollamaName(name string) string {
	if _, ok := s.model(name); ok || name == "" {
		return name
	}
	if base, ok := strings.CutSuffix(name, ":latest"); ok {
		if _, ok := s.model(base); ok {
			return base
		}
	} else if !strings.Contains(name, ":") {
		if _, ok := s.model(name + ":latest"); ok {
			return name + ":latest"
		}
	}
	return name
}
