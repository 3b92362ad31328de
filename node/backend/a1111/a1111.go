// Package a1111 is the backend for AUTOMATIC1111's Stable Diffusion web UI
// (started with --api), serving the imagine query type.
//
//	GET  /sdapi/v1/sd-models -> [{"title": "v1-5.safetensors [6ce0161689]",
//	                              "model_name": "v1-5", ...}]
//	POST /sdapi/v1/txt2img   {"prompt", "width", "height", "steps", "seed",
//	                          "batch_size", "n_iter", "override_settings":
//	                          {"sd_model_checkpoint": title}, ...}
//	                      -> {"images": [base64 PNG, ...], ...}
//	POST /sdapi/v1/interrupt (stops the image being generated)
//
// Each checkpoint is announced under its model_name; a query selects it with
// override_settings, which A1111 restores afterwards. Generation does not
// stop when an HTTP client hangs up, so a cancelled or timed-out query also
// posts /sdapi/v1/interrupt (WithInterrupt(false) turns that off for an
// A1111 shared with other users, where it could stop someone else's image).
package a1111

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/backend/a1111")

const (
	// Kind is the backend kind, as in --backend a1111=URL.
	Kind = "a1111"
	// DefaultTimeout bounds one txt2img call.
	DefaultTimeout = 5 * time.Minute
	// ProbeTimeout bounds a model list or health call.
	ProbeTimeout = 10 * time.Second
	// MaxResponse bounds a txt2img answer (base64 images).
	MaxResponse = 32 << 20
	// DefaultSteps, DefaultWidth and DefaultHeight are used when the query
	// does not say (A1111's own defaults are the same size, fewer steps than
	// the seed's 50).
	DefaultSteps  = 20
	DefaultWidth  = 512
	DefaultHeight = 512
	// MaxSide bounds either side of a requested image.
	MaxSide = 2048

	maxModelList     = 4 << 20
	maxModels        = protocol.MaxAnnModels
	maxImages        = 4
	interruptTimeout = 5 * time.Second
)

var _ backend.Backend = (*Backend)(nil)

// Backend calls one AUTOMATIC1111 server.
type Backend struct {
	base      string
	timeout   time.Duration
	steps     int
	client    *http.Client
	interrupt bool

	mu     sync.Mutex
	titles map[string]string // announced name -> checkpoint title, from the last list
}

// Option configures a Backend.
type Option func(*Backend)

// WithTimeout bounds each txt2img call (the query's own deadline applies too).
func WithTimeout(d time.Duration) Option { return func(b *Backend) { b.timeout = d } }

// WithSteps sets the sampling steps per image.
func WithSteps(n int) Option { return func(b *Backend) { b.steps = n } }

// WithInterrupt sets whether a cancelled or timed-out query interrupts the
// generation on the server (default true).
func WithInterrupt(on bool) Option { return func(b *Backend) { b.interrupt = on } }

// WithHTTPClient sets the HTTP client; the backend still refuses redirects.
func WithHTTPClient(c *http.Client) Option { return func(b *Backend) { b.client = c } }

// New builds a backend for the server at baseURL, e.g. http://127.0.0.1:7860.
func New(baseURL string, opts ...Option) (*Backend, error) {
	u, err := httputil.BaseURL(baseURL)
	if err != nil {
		return nil, fmt.Errorf("a1111: %w", err)
	}
	b := &Backend{
		base:      u.String(),
		timeout:   DefaultTimeout,
		steps:     DefaultSteps,
		interrupt: true,
	}
	for _, o := range opts {
		o(b)
	}
	if b.timeout <= 0 {
		return nil, fmt.Errorf("a1111 timeout %s: must be positive", b.timeout)
	}
	if b.steps < 1 || b.steps > 150 {
		return nil, fmt.Errorf("a1111 steps %d: want 1..150", b.steps)
	}
	b.client = httputil.NoRedirects(b.client)
	return b, nil
}

func (b *Backend) Kind() string { return Kind }
func (b *Backend) Name() string { return Kind + " " + b.base }

type sdModel struct {
	Title     string `json:"title"`
	ModelName string `json:"model_name"`
}

// Models lists the server's checkpoints, each serving imagine.
func (b *Backend) Models(ctx context.Context) ([]backend.Model, error) {
	list, err := b.listModels(ctx)
	if err != nil {
		return nil, err
	}
	titles := make(map[string]string, len(list))
	var out []backend.Model
	for _, m := range list {
		name := m.ModelName
		if name == "" {
			name = m.Title
		}
		title := m.Title
		if title == "" {
			title = name
		}
		if protocol.ValidateModelName(name) != nil {
			continue
		}
		if _, dup := titles[name]; dup || len(out) >= maxModels {
			continue
		}
		titles[name] = title
		out = append(out, backend.Model{Name: name, Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_IMAGINE}})
	}
	b.mu.Lock()
	b.titles = titles
	b.mu.Unlock()
	return out, nil
}

func (b *Backend) listModels(ctx context.Context) ([]sdModel, error) {
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	req, err := httputil.NewGetRequest(b.base + "/sdapi/v1/sd-models")
	if err != nil {
		return nil, err
	}
	var list []sdModel
	if err := b.call(ctx, req, ProbeTimeout, maxModelList, &list); err != nil {
		return nil, err
	}
	return list, nil
}

// Probe checks that the API answers its model list.
func (b *Backend) Probe(ctx context.Context) error {
	_, err := b.listModels(ctx)
	return err
}

// call sends req, waiting at most wait, and decodes a 200 answer of at most
// limit bytes into v. Failures come back as typed errors.
func (b *Backend) call(ctx context.Context, req *http.Request, wait time.Duration, limit int64, v any, opts ...httputil.Option) error {
	req.Header.Set("Accept", "application/json")
	x, err := httputil.Send(ctx, b.client, req, wait, 0, opts...)
	if err != nil {
		log.Debugw("request failed", "server", b.base, "path", req.URL.Path, "err", err)
		return err
	}
	defer x.Close()
	if x.Resp.StatusCode != http.StatusOK {
		return x.QueryError()
	}
	return x.ReadJSON(limit, v)
}

type txt2imgRequest struct {
	Prompt           string            `json:"prompt"`
	NegativePrompt   string            `json:"negative_prompt"`
	Width            int               `json:"width"`
	Height           int               `json:"height"`
	Steps            int               `json:"steps"`
	Seed             int64             `json:"seed"`
	BatchSize        int               `json:"batch_size"`
	NIter            int               `json:"n_iter"`
	SendImages       bool              `json:"send_images"`
	SaveImages       bool              `json:"save_images"`
	OverrideSettings map[string]string `json:"override_settings"`
}

type txt2imgResponse struct {
	Images []string `json:"images"`
}

// Run generates one image for an imagine query and emits it as Media.
func (b *Backend) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if req.GetType() != pb.QueryType_QUERY_TYPE_IMAGINE {
		return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "a1111 serves imagine queries, not %s", protocol.TypeName(req.GetType()))
	}
	title, err := b.title(ctx, req.GetModel())
	if err != nil {
		return backend.Usage{}, err
	}
	prompt := promptOf(req)
	if strings.TrimSpace(prompt) == "" {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "empty prompt")
	}
	w, h, err := size(req.GetParams().GetSize())
	if err != nil {
		return backend.Usage{}, err
	}
	tr := txt2imgRequest{
		Prompt: prompt, Width: w, Height: h, Steps: b.steps, Seed: -1,
		BatchSize: 1, NIter: 1, SendImages: true, SaveImages: false,
		OverrideSettings: map[string]string{"sd_model_checkpoint": title},
	}
	if p := req.GetParams(); p != nil && p.Seed != nil {
		tr.Seed = p.GetSeed()
	}
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	images, err := b.txt2img(ctx, tr)
	if err != nil {
		// ContextError, not ctx.Err: past the deadline, the watchdog can
		// end the call before ctx's own timer has fired.
		if httputil.ContextError(ctx) != nil && b.interrupt {
			b.interruptGeneration()
		}
		return backend.Usage{}, err
	}
	for _, img := range images {
		if err := out.Media(http.DetectContentType(img), img); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{}, nil
}

// title maps an announced model name to its checkpoint title, refreshing the
// list once if the name is not known yet.
func (b *Backend) title(ctx context.Context, model string) (string, error) {
	b.mu.Lock()
	t, ok := b.titles[model]
	b.mu.Unlock()
	if ok {
		return t, nil
	}
	if _, err := b.Models(ctx); err != nil {
		return "", err
	}
	b.mu.Lock()
	t, ok = b.titles[model]
	b.mu.Unlock()
	if !ok {
		return "", protocol.Errorf(protocol.CodeUnsupported, "a1111 has no checkpoint %q", model)
	}
	return t, nil
}

func (b *Backend) txt2img(ctx context.Context, body txt2imgRequest) ([][]byte, error) {
	req, err := httputil.NewJSONRequest(b.base+"/sdapi/v1/txt2img", body)
	if err != nil {
		return nil, err
	}
	// A1111 answers 404 when a request names a sampler, script or upscaler it
	// lacks; this backend has always read that as BAD_REQUEST, not
	// httputil's UNSUPPORTED, and its callers and tests rely on it.
	var tr txt2imgResponse
	if err := b.call(ctx, req, b.timeout, MaxResponse, &tr, httputil.MapStatus(http.StatusNotFound, protocol.CodeBadRequest)); err != nil {
		return nil, err
	}
	if len(tr.Images) == 0 {
		return nil, protocol.Errorf(protocol.CodeBackendError, "a1111 answered without an image")
	}
	if len(tr.Images) > maxImages {
		tr.Images = tr.Images[:maxImages]
	}
	images := make([][]byte, 0, len(tr.Images))
	for _, s := range tr.Images {
		img, err := decodeImage(s)
		if err != nil {
			return nil, err
		}
		images = append(images, img)
	}
	return images, nil
}

// interruptGeneration asks the server to stop the image in progress. It runs
// after our own context is done, so it has its own short deadline.
func (b *Backend) interruptGeneration() {
	ctx, cancel := context.WithTimeout(context.Background(), interruptTimeout)
	defer cancel()
	req, err := http.NewRequest(http.MethodPost, b.base+"/sdapi/v1/interrupt", nil)
	if err != nil {
		return
	}
	x, err := httputil.Send(ctx, b.client, req, interruptTimeout, 0)
	if err != nil {
		log.Debugw("interrupt failed", "server", b.base, "err", err)
		return
	}
	defer x.Close()
	_, _ = httputil.ReadAll(x, httputil.MaxErrorBody)
}

func decodeImage(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "data:") {
		if _, after, ok := strings.Cut(s, ","); ok {
			s = after
		}
	}
	img, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, protocol.Errorf(protocol.CodeBackendError, "a1111 image is not base64")
	}
	if mime := http.DetectContentType(img); !strings.HasPrefix(mime, "image/") {
		return nil, protocol.Errorf(protocol.CodeBackendError, "a1111 answer is not an image (%s)", mime)
	}
	if len(img) > httputil.MaxMedia {
		return nil, protocol.Errorf(protocol.CodeTooLarge, "image of %d bytes exceeds the %d byte media limit", len(img), httputil.MaxMedia)
	}
	return img, nil
}

// size parses "WIDTHxHEIGHT"; empty means the defaults.
func size(s string) (int, int, error) {
	if s == "" {
		return DefaultWidth, DefaultHeight, nil
	}
	ws, hs, ok := strings.Cut(strings.ToLower(s), "x")
	w, err1 := strconv.Atoi(ws)
	h, err2 := strconv.Atoi(hs)
	if !ok || err1 != nil || err2 != nil || w < 64 || h < 64 || w > MaxSide || h > MaxSide {
		return 0, 0, protocol.Errorf(protocol.CodeBadRequest, "image size %q: want WIDTHxHEIGHT, each 64..%d", s, MaxSide)
	}
	return w, h, nil
}

// promptOf is the prompt, or the last user message.
func promptOf(req *pb.QueryRequest) string {
	if p := req.GetPrompt(); strings.TrimSpace(p) != "" {
		return p
	}
	msgs := req.GetMessages()
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].GetRole() == "user" || msgs[i].GetRole() == "" {
			return msgs[i].GetContent()
		}
	}
	return ""
}
