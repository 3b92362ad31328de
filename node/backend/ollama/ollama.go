// Package ollama is the backend for an Ollama server, through its native
// API: /api/tags and /api/show for models and their capabilities,
// /api/chat (streamed NDJSON) for chat and vision, /api/embed for
// embeddings.
package ollama

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/backend/ollama")

// Defaults for the options.
const (
	DefaultTimeout     = 30 * time.Second
	DefaultWorkTimeout = 5 * time.Minute
	DefaultIdleTimeout = 60 * time.Second
	// showParallel bounds concurrent /api/show calls while listing models.
	showParallel = 4
	// maxListBody bounds /api/tags and /api/show answers.
	maxListBody = 8 << 20
	// maxEmbedBody bounds an /api/embed answer (256 inputs of 8k floats).
	maxEmbedBody = 64 << 20
	// maxModels bounds how many models one server may announce.
	maxModels = protocol.MaxAnnModels
)

// Backend talks to one Ollama server.
type Backend struct {
	base   string // without trailing slash
	client *http.Client
	// timeout bounds metadata calls; work bounds the wait for a working
	// answer to start (model loading included); idle bounds each silence
	// inside a streamed answer.
	timeout, work, idle time.Duration

	mu    sync.Mutex
	cache map[string]cached // model name → what /api/show said for its digest
}

type cached struct {
	digest string
	model  backend.Model
}

// Option configures the backend.
type Option func(*Backend)

// WithHTTPClient sets the HTTP client (default: a client on
// httputil.NewTransport without an overall timeout; the backend sets its
// own per call).
func WithHTTPClient(c *http.Client) Option { return func(b *Backend) { b.client = c } }

// WithTimeout bounds metadata calls: model list, show, probe.
func WithTimeout(d time.Duration) Option { return func(b *Backend) { b.timeout = d } }

// WithWorkTimeout bounds the wait for a query's answer to begin, which
// includes Ollama loading the model, and whole non-streamed answers
// (embeddings).
func WithWorkTimeout(d time.Duration) Option { return func(b *Backend) { b.work = d } }

// WithIdleTimeout bounds the silence between two chunks of a streamed
// answer; a server that says nothing for longer has stalled.
func WithIdleTimeout(d time.Duration) Option { return func(b *Backend) { b.idle = d } }

// New builds a backend for the server at baseURL, e.g.
// http://127.0.0.1:11434.
func New(baseURL string, opts ...Option) (*Backend, error) {
	u, err := httputil.BaseURL(baseURL)
	if err != nil {
		return nil, fmt.Errorf("ollama: %w", err)
	}
	b := &Backend{
		base:    u.String(),
		client:  &http.Client{Transport: httputil.NewTransport()},
		timeout: DefaultTimeout, work: DefaultWorkTimeout, idle: DefaultIdleTimeout,
		cache: map[string]cached{},
	}
	for _, o := range opts {
		o(b)
	}
	// A redirect would carry the prompt (and the API key, to the same
	// host) wherever whatever holds the server's port points it.
	b.client = httputil.NoRedirects(b.client)
	if b.timeout <= 0 || b.work <= 0 || b.idle <= 0 {
		return nil, fmt.Errorf("ollama: timeouts must be positive")
	}
	return b, nil
}

func (b *Backend) Kind() string { return "ollama" }
func (b *Backend) Name() string { return "ollama " + b.base }

// Probe asks the server for its version.
func (b *Backend) Probe(ctx context.Context) error {
	req, err := httputil.NewGetRequest(b.base + "/api/version")
	if err != nil {
		return err
	}
	x, err := httputil.Send(ctx, b.client, req, b.timeout, 0)
	if err != nil {
		return err
	}
	defer x.Close()
	var v struct{ Version string }
	return x.ReadJSON(maxListBody, &v)
}

// tagsResponse is the answer of GET /api/tags.
type tagsResponse struct {
	Models []struct {
		Name    string `json:"name"`
		Model   string `json:"model"`
		Digest  string `json:"digest"`
		Details details
	} `json:"models"`
}

type details struct {
	Family   string   `json:"family"`
	Families []string `json:"families"`
}

// showResponse is the part of POST /api/show the backend reads.
type showResponse struct {
	Capabilities []string       `json:"capabilities"`
	ModelInfo    map[string]any `json:"model_info"`
	Details      details        `json:"details"`
}

// Models lists the server's models with their query types and context
// length, from /api/show where the server reports them. What /api/show
// says is cached per model digest, so the periodic listing costs one call.
func (b *Backend) Models(ctx context.Context) ([]backend.Model, error) {
	req, err := httputil.NewGetRequest(b.base + "/api/tags")
	if err != nil {
		return nil, err
	}
	x, err := httputil.Send(ctx, b.client, req, b.timeout, 0)
	if err != nil {
		return nil, err
	}
	var tags tagsResponse
	err = x.ReadJSON(maxListBody, &tags)
	x.Close()
	if err != nil {
		return nil, err
	}
	if len(tags.Models) > maxModels {
		log.Warnf("%s lists %d models; announcing the first %d", b.base, len(tags.Models), maxModels)
		tags.Models = tags.Models[:maxModels]
	}

	out := make([]backend.Model, len(tags.Models))
	keep := make(map[string]bool, len(tags.Models))
	sem := make(chan struct{}, showParallel)
	var wg sync.WaitGroup
	for i, m := range tags.Models {
		name := m.Name
		if name == "" {
			name = m.Model
		}
		if protocol.ValidateModelName(name) != nil {
			continue
		}
		keep[name] = true
		if c, ok := b.cached(name, m.Digest); ok {
			out[i] = c
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			out[i] = b.show(ctx, name, m.Digest, m.Details)
		}()
	}
	wg.Wait()
	if err := httputil.ContextError(ctx); err != nil {
		return nil, err
	}
	b.prune(keep)
	models := out[:0]
	for _, m := range out {
		if m.Name != "" {
			models = append(models, m)
		}
	}
	return models, nil
}

func (b *Backend) cached(name, digest string) (backend.Model, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c, ok := b.cache[name]
	return c.model, ok && digest != "" && c.digest == digest
}

// prune forgets models the server no longer lists, bounding the cache.
func (b *Backend) prune(keep map[string]bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for name := range b.cache {
		if !keep[name] {
			delete(b.cache, name)
		}
	}
}

// show asks /api/show about one model. On failure (an old server, a
// model being deleted) it guesses from the name and family, and does not
// cache the guess.
func (b *Backend) show(ctx context.Context, name, digest string, d details) backend.Model {
	m := backend.Model{Name: name}
	var s showResponse
	err := b.postJSON(ctx, "/api/show", map[string]string{"model": name}, &s)
	if err != nil {
		log.Debugf("show %s: %v; guessing its capabilities", name, err)
		m.Types = guessTypes(name, d)
		return m
	}
	m.Types = typesFrom(s.Capabilities)
	if len(m.Types) == 0 {
		m.Types = guessTypes(name, s.Details)
	}
	m.Features = featuresFrom(s.Capabilities)
	for k, v := range s.ModelInfo {
		if strings.HasSuffix(k, ".context_length") {
			if f, ok := v.(float64); ok && f > 0 && f < 1<<32 {
				m.ContextLength = uint32(f)
			}
		}
	}
	if digest != "" {
		b.mu.Lock()
		b.cache[name] = cached{digest: digest, model: m}
		b.mu.Unlock()
	}
	return m
}

// typesFrom maps Ollama's capabilities to query types; "tools",
// "insert", "thinking" and others have no query type of their own.
func typesFrom(caps []string) []pb.QueryType {
	var ts []pb.QueryType
	for _, c := range caps {
		switch c {
		case "completion":
			ts = append(ts, pb.QueryType_QUERY_TYPE_CHAT)
		case "vision":
			ts = append(ts, pb.QueryType_QUERY_TYPE_VISION)
		case "embedding":
			ts = append(ts, pb.QueryType_QUERY_TYPE_EMBED)
		}
	}
	return ts
}

// featuresFrom maps Ollama's capabilities to model features: "tools" is
// tool calling; every "completion" model takes a format (JSON or a JSON
// schema, enforced by a grammar) and continues an answer. Models whose server does not report
// capabilities announce none: nothing is assumed.
func featuresFrom(caps []string) []string {
	var fs []string
	for _, c := range caps {
		switch c {
		case "tools":
			fs = append(fs, protocol.FeatureTools)
		case "completion":
			// Ollama continues a final assistant message (prefill).
			fs = append(fs, protocol.FeatureJSONObject, protocol.FeatureJSONSchema, protocol.FeatureContinue)
		}
	}
	return fs
}

// guessTypes is the fallback for servers that do not report
// capabilities: BERT-family and "embed" models embed, CLIP-bearing ones
// see, anything else chats.
func guessTypes(name string, d details) []pb.QueryType {
	fams := strings.ToLower(d.Family + " " + strings.Join(d.Families, " "))
	if strings.Contains(strings.ToLower(name), "embed") || strings.Contains(fams, "bert") {
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_EMBED}
	}
	ts := []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}
	if strings.Contains(fams, "clip") || strings.Contains(fams, "mllama") {
		ts = append(ts, pb.QueryType_QUERY_TYPE_VISION)
	}
	return ts
}

// postJSON is a metadata POST with a bounded JSON answer.
func (b *Backend) postJSON(ctx context.Context, path string, in, out any) error {
	req, err := httputil.NewJSONRequest(b.base+path, in)
	if err != nil {
		return err
	}
	x, err := httputil.Send(ctx, b.client, req, b.timeout, 0)
	if err != nil {
		return err
	}
	defer x.Close()
	return x.ReadJSON(maxListBody, out)
}

// Run answers one query.
func (b *Backend) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION:
		return b.chat(ctx, req, out)
	case pb.QueryType_QUERY_TYPE_EMBED:
		return b.embed(ctx, req, out)
	}
	return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "the ollama backend does not serve %s queries", protocol.TypeName(req.GetType()))
}

type chatMessage struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	Images    [][]byte   `json:"images,omitempty"` // base64 in JSON, as Ollama wants
	ToolCalls []toolCall `json:"tool_calls,omitempty"`
	ToolName  string     `json:"tool_name,omitempty"`
}

// toolCall is Ollama's: arguments are a JSON object, not text.
type toolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     *uint32         `json:"index,omitempty"`
		Name      string          `json:"name"`
		Arguments json.RawMessage `json:"arguments"`
	} `json:"function"`
}

type tool struct {
	Type     string `json:"type"`
	Function struct {
		Name        string          `json:"name"`
		Description string          `json:"description,omitempty"`
		Parameters  json.RawMessage `json:"parameters,omitempty"`
	} `json:"function"`
}

type chatRequest struct {
	Model    string          `json:"model"`
	Messages []chatMessage   `json:"messages"`
	Stream   bool            `json:"stream"`
	Options  map[string]any  `json:"options,omitempty"`
	Tools    []tool          `json:"tools,omitempty"`
	Format   json.RawMessage `json:"format,omitempty"`
}

type chatLine struct {
	Message struct {
		Content   string     `json:"content"`
		ToolCalls []toolCall `json:"tool_calls"`
	} `json:"message"`
	Done            bool   `json:"done"`
	DoneReason      string `json:"done_reason"`
	PromptEvalCount uint32 `json:"prompt_eval_count"`
	EvalCount       uint32 `json:"eval_count"`
	Error           string `json:"error"`
}

func (b *Backend) chat(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	msgs, err := messages(q)
	if err != nil {
		return backend.Usage{}, err
	}
	if c := q.GetContinuation(); c != "" {
		// Ollama continues a final assistant message and streams only
		// what follows it.
		msgs = append(msgs, chatMessage{Role: "assistant", Content: c})
	}
	body := chatRequest{Model: q.GetModel(), Messages: msgs, Stream: true, Options: options(q.GetParams()),
		Tools: tools(q), Format: format(q.GetResponseFormat())}
	req, err := httputil.NewJSONRequest(b.base+"/api/chat", body)
	if err != nil {
		return backend.Usage{}, err
	}
	x, err := httputil.Send(ctx, b.client, req, b.work, b.idle)
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	lines := httputil.NewLines(x, httputil.MaxLine)
	var calls uint32
	for {
		line, err := lines.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return backend.Usage{}, httputil.Truncated()
			}
			return backend.Usage{}, err
		}
		var l chatLine
		if err := json.Unmarshal(line, &l); err != nil {
			return backend.Usage{}, httputil.Malformed("%v", err)
		}
		if l.Error != "" {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "ollama: %s", httputil.Clip(l.Error, httputil.MaxMessage))
		}
		if err := httputil.SendText(out, l.Message.Content); err != nil {
			return backend.Usage{}, err
		}
		// Ollama sends each tool call whole, in one line.
		for _, c := range l.Message.ToolCalls {
			id := c.ID
			if id == "" {
				id = fmt.Sprintf("call_%x_%d", q.GetId(), calls)
			}
			args := string(c.Function.Arguments)
			if isNullJSON(args) {
				args = "{}"
			}
			if err := backend.SendToolCall(out, &pb.ToolCallDelta{Index: calls, Id: id, Name: c.Function.Name, Arguments: args}); err != nil {
				return backend.Usage{}, err
			}
			calls++
		}
		if l.Done {
			// The answer is whole: let the transport see the body's end
			// and keep the connection for the next query.
			x.Finish()
			reason := finishReason(l.DoneReason)
			if calls > 0 && reason == protocol.FinishStop {
				reason = protocol.FinishToolCalls // as Ollama's own OpenAI API says
			}
			return backend.Usage{PromptTokens: l.PromptEvalCount, CompletionTokens: l.EvalCount, FinishReason: reason}, nil
		}
	}
}

// finishReason maps Ollama's done_reason; "load" and "unload" are no
// answers and map to "".
func finishReason(r string) string {
	switch r {
	case "stop":
		return protocol.FinishStop
	case "length":
		return protocol.FinishLength
	}
	return ""
}

func isNullJSON(s string) bool {
	s = strings.TrimSpace(s)
	return s == "" || s == "null"
}

// tools converts the query's tools. Ollama has no tool_choice: "none"
// sends no tools, "function" only the tool named; "required" cannot be
// enforced and is left to the model.
func tools(q *pb.QueryRequest) []tool {
	c := q.GetToolChoice()
	if c.GetMode() == "none" {
		return nil
	}
	var out []tool
	for _, t := range q.GetTools() {
		if c.GetMode() == "function" && t.GetName() != c.GetName() {
			continue
		}
		var o tool
		o.Type = "function"
		o.Function.Name, o.Function.Description = t.GetName(), t.GetDescription()
		if t.GetParameters() != "" {
			o.Function.Parameters = json.RawMessage(t.GetParameters())
		}
		out = append(out, o)
	}
	return out
}

// format maps a response format to Ollama's format: "json" or a schema.
func format(f *pb.ResponseFormat) json.RawMessage {
	switch f.GetType() {
	case "json_object":
		return json.RawMessage(`"json"`)
	case "json_schema":
		return json.RawMessage(f.GetSchema())
	}
	return nil
}

// messages converts the query's conversation. A bare prompt becomes a
// user message; images attached to the request rather than to a message
// go with the last user message.
func messages(q *pb.QueryRequest) ([]chatMessage, error) {
	var msgs []chatMessage
	for _, m := range q.GetMessages() {
		cm := chatMessage{Role: m.GetRole(), Content: m.GetContent(), ToolName: m.GetName()}
		for _, c := range m.GetToolCalls() {
			var tc toolCall
			tc.ID, tc.Function.Name = c.GetId(), c.GetName()
			tc.Function.Arguments = json.RawMessage(c.GetArguments())
			if !json.Valid(tc.Function.Arguments) {
				// Ollama wants an object; a model's broken arguments are
				// kept as text rather than failing the conversation.
				b, _ := json.Marshal(map[string]string{"_raw": c.GetArguments()})
				tc.Function.Arguments = b
			}
			cm.ToolCalls = append(cm.ToolCalls, tc)
		}
		for _, a := range m.GetAttachments() {
			if !strings.HasPrefix(a.GetMime(), "image/") {
				return nil, protocol.Errorf(protocol.CodeBadRequest, "ollama takes only image attachments, not %s", a.GetMime())
			}
			cm.Images = append(cm.Images, a.GetData())
		}
		msgs = append(msgs, cm)
	}
	if p := q.GetPrompt(); strings.TrimSpace(p) != "" {
		msgs = append(msgs, chatMessage{Role: "user", Content: p})
	}
	if len(msgs) == 0 {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "no messages and no prompt")
	}
	for _, a := range q.GetAttachments() {
		if !strings.HasPrefix(a.GetMime(), "image/") {
			return nil, protocol.Errorf(protocol.CodeBadRequest, "ollama takes only image attachments, not %s", a.GetMime())
		}
		i := len(msgs) - 1
		for j := i; j >= 0; j-- {
			if msgs[j].Role == "user" {
				i = j
				break
			}
		}
		msgs[i].Images = append(msgs[i].Images, a.GetData())
	}
	return msgs, nil
}

// options maps query parameters to Ollama's model options.
func options(p *pb.Params) map[string]any {
	o := map[string]any{}
	if p.GetMaxTokens() > 0 {
		o["num_predict"] = p.GetMaxTokens()
	}
	if p != nil && p.Temperature != nil {
		o["temperature"] = p.GetTemperature()
	}
	if p != nil && p.TopP != nil {
		o["top_p"] = p.GetTopP()
	}
	if p != nil && p.Seed != nil {
		o["seed"] = p.GetSeed()
	}
	if p != nil && p.PresencePenalty != nil {
		o["presence_penalty"] = p.GetPresencePenalty()
	}
	if p != nil && p.FrequencyPenalty != nil {
		o["frequency_penalty"] = p.GetFrequencyPenalty()
	}
	if len(p.GetStop()) > 0 {
		o["stop"] = p.GetStop()
	}
	if len(o) == 0 {
		return nil
	}
	return o
}

func (b *Backend) embed(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	inputs := q.GetInputs()
	if len(inputs) == 0 {
		if strings.TrimSpace(q.GetPrompt()) == "" {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "embed needs inputs or a prompt")
		}
		inputs = []string{q.GetPrompt()}
	}
	req, err := httputil.NewJSONRequest(b.base+"/api/embed", map[string]any{"model": q.GetModel(), "input": inputs})
	if err != nil {
		return backend.Usage{}, err
	}
	x, err := httputil.Send(ctx, b.client, req, b.work, 0)
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	var r struct {
		Embeddings      [][]float32 `json:"embeddings"`
		PromptEvalCount uint32      `json:"prompt_eval_count"`
	}
	if err := x.ReadJSON(maxEmbedBody, &r); err != nil {
		return backend.Usage{}, err
	}
	if len(r.Embeddings) != len(inputs) {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "ollama returned %d embeddings for %d inputs", len(r.Embeddings), len(inputs))
	}
	for i, v := range r.Embeddings {
		if len(v) == 0 || len(v) > protocol.MaxEmbeddingDim {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "ollama returned an embedding of dimension %d", len(v))
		}
		if err := out.Embedding(i, v); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{PromptTokens: r.PromptEvalCount}, nil
}
