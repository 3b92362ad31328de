// Package openai is the backend for any OpenAI-compatible server (llama.cpp
// server, vLLM, LM Studio, LocalAI, TGI, Ollama's /v1, ...): /v1/models,
// /v1/chat/completions streamed as server-sent events (image content parts
// for vision), /v1/embeddings, /v1/images/generations,
// /v1/audio/transcriptions and /v1/audio/speech where the server has them.
package openai

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	logging "github.com/ipfs/go-log/v2"

	jsonv2 "github.com/go-json-experiment/json"
	jsonv1 "github.com/go-json-experiment/json/v1"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/backend/openai")

// Defaults for the options.
const (
	DefaultTimeout     = 30 * time.Second
	DefaultWorkTimeout = 5 * time.Minute
	DefaultIdleTimeout = 60 * time.Second
	maxListBody        = 8 << 20
	maxEmbedBody       = 64 << 20
	// maxImageBody bounds an images answer: base64 of one media frame.
	maxImageBody = httputil.MaxMedia/3*4 + 64<<10
)

// Backend talks to one OpenAI-compatible server.
type Backend struct {
	root   string // server root, without /v1 and trailing slash
	key    string
	client *http.Client
	// timeout bounds metadata calls; work bounds the wait for a working
	// answer to start and whole non-streamed answers; idle bounds each
	// silence inside a streamed answer.
	timeout, work, idle time.Duration
	declared            map[string][]pb.QueryType
	features            []string // announced with every chat model
	// chunkJSON decodes each streamed chunk: encoding/json's semantics
	// (case-insensitive names, invalid UTF-8 replaced, duplicates allowed)
	// at a third of its cost and 2 allocations instead of 11 per token.
	chunkJSON jsonv2.Options
}

// Option configures the backend.
type Option func(*Backend)

// WithAPIKey sends key as a bearer token.
func WithAPIKey(key string) Option { return func(b *Backend) { b.key = key } }

// WithHTTPClient sets the HTTP client (default: one on
// httputil.NewTransport without an overall timeout; the backend sets its
// own per call).
func WithHTTPClient(c *http.Client) Option { return func(b *Backend) { b.client = c } }

// WithTimeout bounds metadata calls: model list and probe.
func WithTimeout(d time.Duration) Option { return func(b *Backend) { b.timeout = d } }

// WithWorkTimeout bounds the wait for a query's answer to begin and whole
// non-streamed answers (embeddings, images, audio).
func WithWorkTimeout(d time.Duration) Option { return func(b *Backend) { b.work = d } }

// WithIdleTimeout bounds the silence between two chunks of a streamed
// answer; a server that says nothing for longer has stalled.
func WithIdleTimeout(d time.Duration) Option { return func(b *Backend) { b.idle = d } }

// WithModelTypes declares the query types of models, overriding what the
// backend would guess from /v1/models. A declared model the server does
// not list is served too (some servers have no /v1/models).
func WithModelTypes(types map[string][]pb.QueryType) Option {
	return func(b *Backend) {
		for name, ts := range types {
			b.declared[name] = slices.Clone(ts)
		}
	}
}

// Features the server of an openai backend may be declared to have. The
// OpenAI API gives no way to ask a server which of them it honours (most
// silently ignore what they do not know), so they are declared, never
// assumed.
var knownFeatures = []string{protocol.FeatureTools, protocol.FeatureJSONObject, protocol.FeatureJSONSchema,
	protocol.FeatureLogprobs, protocol.FeatureContinue}

// WithFeatures declares what the server honours for its chat models:
// protocol.FeatureTools (tools and tool_calls), FeatureJSONObject and
// FeatureJSONSchema (response_format), FeatureLogprobs, FeatureContinue
// (it continues a final assistant message: llama.cpp's server, or vLLM
// with continue_final_message). They are announced, and queries needing
// them are sent here.
func WithFeatures(fs ...string) Option {
	return func(b *Backend) {
		for _, f := range fs {
			if !slices.Contains(b.features, f) {
				b.features = append(b.features, f)
			}
		}
	}
}

// New builds a backend for the server at baseURL, its root with or
// without /v1, e.g. http://127.0.0.1:8080 or http://127.0.0.1:8080/v1.
func New(baseURL string, opts ...Option) (*Backend, error) {
	u, err := httputil.BaseURL(baseURL)
	if err != nil {
		return nil, fmt.Errorf("openai: %w", err)
	}
	root := strings.TrimSuffix(u.String(), "/v1")
	b := &Backend{
		root:    root,
		client:  &http.Client{Transport: httputil.NewTransport()},
		timeout: DefaultTimeout, work: DefaultWorkTimeout, idle: DefaultIdleTimeout,
		declared:  map[string][]pb.QueryType{},
		chunkJSON: jsonv1.DefaultOptionsV1(),
	}
	for _, o := range opts {
		o(b)
	}
	// A redirect would carry the prompt (and the API key, to the same
	// host) wherever whatever holds the server's port points it.
	b.client = httputil.NoRedirects(b.client)
	if b.timeout <= 0 || b.work <= 0 || b.idle <= 0 {
		return nil, fmt.Errorf("openai: timeouts must be positive")
	}
	for _, f := range b.features {
		if !slices.Contains(knownFeatures, f) {
			return nil, fmt.Errorf("openai: unknown feature %q (known: %s)", f, strings.Join(knownFeatures, ", "))
		}
	}
	for name, ts := range b.declared {
		if err := protocol.ValidateModelName(name); err != nil {
			return nil, fmt.Errorf("openai: declared model: %w", err)
		}
		if len(ts) == 0 {
			return nil, fmt.Errorf("openai: declared model %q has no types", name)
		}
	}
	return b, nil
}

func (b *Backend) Kind() string { return "openai" }
func (b *Backend) Name() string { return "openai " + b.root }

// authorize adds the API key, if any.
func (b *Backend) authorize(req *http.Request) *http.Request {
	if b.key != "" {
		req.Header.Set("Authorization", "Bearer "+b.key)
	}
	return req
}

// send performs one exchange with the server.
func (b *Backend) send(ctx context.Context, req *http.Request, first, idle time.Duration) (*httputil.Exchange, error) {
	return httputil.Send(ctx, b.client, b.authorize(req), first, idle)
}

// modelEntry is one entry of /v1/models, with the optional fields some
// servers add: vLLM's max_model_len, llama.cpp's meta.n_ctx_train, a
// type or capabilities list (LM Studio, llama.cpp).
type modelEntry struct {
	ID            string `json:"id"`
	Type          string `json:"type"`
	Capabilities  any    `json:"capabilities"`
	MaxModelLen   uint32 `json:"max_model_len"`
	ContextLength uint32 `json:"context_length"`
	Meta          struct {
		NCtxTrain uint32 `json:"n_ctx_train"`
	} `json:"meta"`
}

func (b *Backend) list(ctx context.Context) ([]modelEntry, error) {
	req, err := httputil.NewGetRequest(b.root + "/v1/models")
	if err != nil {
		return nil, err
	}
	x, err := b.send(ctx, req, b.timeout, 0)
	if err != nil {
		return nil, err
	}
	defer x.Close()
	var r struct {
		Data []modelEntry `json:"data"`
	}
	if err := x.ReadJSON(maxListBody, &r); err != nil {
		return nil, err
	}
	return r.Data, nil
}

// Probe lists the models; a server without /v1/models is up when it
// answers 404 and models were declared.
func (b *Backend) Probe(ctx context.Context) error {
	_, err := b.list(ctx)
	if isUnsupported(err) && len(b.declared) > 0 {
		return nil
	}
	return err
}

func isUnsupported(err error) bool {
	pe := protocol.AsError(err)
	return pe != nil && pe.Code == protocol.CodeUnsupported
}

// Models lists the server's models. Types come from WithModelTypes, else
// from what the server says, else from the model's name.
func (b *Backend) Models(ctx context.Context) ([]backend.Model, error) {
	entries, err := b.list(ctx)
	if err != nil && !(isUnsupported(err) && len(b.declared) > 0) {
		return nil, err
	}
	var out []backend.Model
	seen := map[string]bool{}
	for _, e := range entries {
		if seen[e.ID] || protocol.ValidateModelName(e.ID) != nil {
			continue
		}
		seen[e.ID] = true
		m := backend.Model{Name: e.ID, Types: b.declared[e.ID]}
		if len(m.Types) == 0 {
			m.Types = typesOf(e)
		}
		m.Features = b.featuresFor(m.Types)
		for _, n := range []uint32{e.MaxModelLen, e.ContextLength, e.Meta.NCtxTrain} {
			if n > 0 {
				m.ContextLength = n
				break
			}
		}
		out = append(out, m)
		if len(out) == protocol.MaxAnnModels {
			log.Warnf("%s lists more than %d models; announcing the first %d", b.root, len(out), len(out))
			return out, nil
		}
	}
	for _, name := range slices.Sorted(maps.Keys(b.declared)) {
		if !seen[name] {
			out = append(out, backend.Model{Name: name, Types: slices.Clone(b.declared[name]), Features: b.featuresFor(b.declared[name])})
		}
	}
	return out, nil
}

// featuresFor is what a model of types ts announces: the declared
// features are chat features.
func (b *Backend) featuresFor(ts []pb.QueryType) []string {
	if !slices.Contains(ts, pb.QueryType_QUERY_TYPE_CHAT) && !slices.Contains(ts, pb.QueryType_QUERY_TYPE_VISION) {
		return nil
	}
	return slices.Clone(b.features)
}

// Name patterns for models whose server does not say what they do.
var (
	embedRe   = regexp.MustCompile(`embed|(^|[-_/.:])(bge|e5|gte|minilm|mxbai)([-_/.:]|$)`)
	sttRe     = regexp.MustCompile(`whisper|transcri`)
	ttsRe     = regexp.MustCompile(`(^|[-_/.:])tts([-_/.:0-9]|$)|kokoro|piper`)
	imagineRe = regexp.MustCompile(`dall-e|gpt-image|stable-diffusion|sdxl|(^|[-_/.:])sd[-_.]?[0-9]|flux`)
	visionRe  = regexp.MustCompile(`llava|vision|(^|[-_/.:])vl([-_/.:]|$)|-vl|pixtral|moondream|minicpm-v`)
)

// typesOf says what a listed model does: from the server's type or
// capabilities when present, else from its name; chat by default.
func typesOf(e modelEntry) []pb.QueryType {
	var ts []pb.QueryType
	add := func(t pb.QueryType) {
		if !slices.Contains(ts, t) {
			ts = append(ts, t)
		}
	}
	switch strings.ToLower(e.Type) {
	case "embedding", "embeddings":
		add(pb.QueryType_QUERY_TYPE_EMBED)
	case "llm", "chat":
		add(pb.QueryType_QUERY_TYPE_CHAT)
	case "vlm":
		add(pb.QueryType_QUERY_TYPE_CHAT)
		add(pb.QueryType_QUERY_TYPE_VISION)
	}
	if caps, ok := e.Capabilities.([]any); ok {
		for _, c := range caps {
			switch c {
			case "completion", "chat":
				add(pb.QueryType_QUERY_TYPE_CHAT)
			case "vision", "multimodal":
				add(pb.QueryType_QUERY_TYPE_VISION)
			case "embedding", "embeddings":
				add(pb.QueryType_QUERY_TYPE_EMBED)
			}
		}
	}
	if len(ts) > 0 {
		return ts
	}
	id := strings.ToLower(e.ID)
	switch {
	case embedRe.MatchString(id):
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_EMBED}
	case sttRe.MatchString(id):
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_STT}
	case ttsRe.MatchString(id):
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_TTS}
	case imagineRe.MatchString(id):
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_IMAGINE}
	case visionRe.MatchString(id):
		return []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION}
	}
	return []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}
}

// Run answers one query.
func (b *Backend) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_VISION:
		return b.chat(ctx, req, out)
	case pb.QueryType_QUERY_TYPE_EMBED:
		return b.embed(ctx, req, out)
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		return b.imagine(ctx, req, out)
	case pb.QueryType_QUERY_TYPE_STT:
		return b.transcribe(ctx, req, out)
	case pb.QueryType_QUERY_TYPE_TTS:
		return b.speak(ctx, req, out)
	}
	return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "the openai backend does not serve %s queries", protocol.TypeName(req.GetType()))
}

// promptText is the prompt, or else the last user message's text.
func promptText(q *pb.QueryRequest) string {
	if p := strings.TrimSpace(q.GetPrompt()); p != "" {
		return p
	}
	msgs := q.GetMessages()
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].GetRole() == "user" {
			return strings.TrimSpace(msgs[i].GetContent())
		}
	}
	return ""
}
