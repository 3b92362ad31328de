// Package rentahal is the backend for the seed system's AI workers, so a
// RENTAHAL worker joins the swarm unchanged.
//
// The worker API, as RENTAHAL's webgui.py calls it and its worker main.py
// serves it:
//
//	POST {URL}/predict   {"prompt": str, "type": "chat"|"vision"|"imagine",
//	                      "model_type": "worker", "model_name": str,
//	                      "image": base64 (vision only)}
//	                  -> {"response": str}   (imagine: a base64 image)
//	GET  {URL}/health -> 200 {"status": "healthy"}
//
// The seed's FastAPI workers declare the route as "/predict/" and redirect
// "/predict" there with a 307; some workers serve "/predict" only. Run tries
// the path that last worked and, on 404, 405, 307 or 308, the other one, and
// remembers the answer. Redirects are never followed (a redirect could send
// the prompt anywhere).
//
// A worker answers in one piece and lists no models, so the model name and
// the query types it serves are configured (WithModel, WithTypes). It reports
// no token counts: Usage stays zero, meaning unknown.
package rentahal

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/backend/rentahal")

const (
	// Kind is the backend kind, as in --backend rentahal=URL.
	Kind = "rentahal"
	// DefaultTimeout bounds one /predict call; the seed's workers answer in
	// one piece, and image generation on a small GPU can take minutes.
	DefaultTimeout = 5 * time.Minute
	// ProbeTimeout bounds one /health call.
	ProbeTimeout = 10 * time.Second
	// MaxResponse bounds a /predict answer (a base64 image for imagine).
	MaxResponse = 32 << 20
	// ModelType is what the seed's broker sends as model_type for its own
	// worker nodes (as opposed to "huggingface" or "claude").
	ModelType = "worker"

	maxHealthBody = 64 << 10
	maxStatus     = 64 // bytes of a health status quoted in an error
)

// predictPaths are the two spellings of the predict route.
var predictPaths = [2]string{"/predict", "/predict/"}

var _ backend.Backend = (*Backend)(nil)

// Backend calls one RENTAHAL worker.
type Backend struct {
	base    string // scheme://host[/path] without a trailing slash
	model   string
	types   []pb.QueryType
	timeout time.Duration
	client  *http.Client
	// pathIdx is the index into predictPaths that last worked.
	pathIdx atomic.Int32
}

// Option configures a Backend.
type Option func(*Backend)

// WithModel sets the model name announced for this worker and sent to it as
// model_name.
func WithModel(name string) Option { return func(b *Backend) { b.model = name } }

// WithTypes sets the query types the worker serves (chat, vision, imagine);
// the default is chat.
func WithTypes(types ...pb.QueryType) Option {
	return func(b *Backend) { b.types = append([]pb.QueryType(nil), types...) }
}

// WithTimeout bounds each /predict call (the query's own deadline applies too).
func WithTimeout(d time.Duration) Option { return func(b *Backend) { b.timeout = d } }

// WithHTTPClient sets the HTTP client (its transport and TLS settings); the
// backend still refuses to follow redirects.
func WithHTTPClient(c *http.Client) Option { return func(b *Backend) { b.client = c } }

// New builds a backend for the worker at baseURL, e.g. http://127.0.0.1:8000.
func New(baseURL string, opts ...Option) (*Backend, error) {
	u, err := httputil.BaseURL(baseURL)
	if err != nil {
		return nil, fmt.Errorf("rentahal: %w", err)
	}
	b := &Backend{
		base:    u.String(),
		model:   defaultModel(u),
		types:   []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT},
		timeout: DefaultTimeout,
	}
	for _, o := range opts {
		o(b)
	}
	if err := protocol.ValidateModelName(b.model); err != nil {
		return nil, fmt.Errorf("rentahal model: %w", err)
	}
	if len(b.types) == 0 {
		return nil, fmt.Errorf("rentahal: no query types")
	}
	for _, t := range b.types {
		if _, ok := seedType(t); !ok {
			return nil, fmt.Errorf("rentahal workers serve chat, vision or imagine, not %s", protocol.TypeName(t))
		}
	}
	if b.timeout <= 0 {
		return nil, fmt.Errorf("rentahal timeout %s: must be positive", b.timeout)
	}
	b.client = httputil.NoRedirects(b.client)
	return b, nil
}

// defaultModel names a seed worker, which lists no models. Not after its
// address: model names are shown to every user of the swarm, addresses
// never are. Name it with rentahal=URL,model=NAME.
func defaultModel(*url.URL) string { return Kind }

// seedType is the seed's name for a query type.
func seedType(t pb.QueryType) (string, bool) {
	switch t {
	case pb.QueryType_QUERY_TYPE_CHAT:
		return "chat", true
	case pb.QueryType_QUERY_TYPE_VISION:
		return "vision", true
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		return "imagine", true
	}
	return "", false
}

func (b *Backend) Kind() string { return Kind }
func (b *Backend) Name() string { return Kind + " " + b.base }

// Models reports the one configured model; the worker API has no model list.
func (b *Backend) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: b.model, Types: append([]pb.QueryType(nil), b.types...)}}, nil
}

// Probe calls GET /health and wants 200; a JSON status other than
// "healthy" (or "ok") counts as unhealthy.
func (b *Backend) Probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	req, err := httputil.NewGetRequest(b.base + "/health")
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	x, err := httputil.Send(ctx, b.client, req, ProbeTimeout, 0)
	if err != nil {
		log.Debugw("health check failed", "worker", b.base, "err", err)
		return err
	}
	defer x.Close()
	if x.Resp.StatusCode != http.StatusOK {
		return x.StatusError()
	}
	body, err := httputil.ReadAll(x, maxHealthBody)
	if err != nil {
		return err
	}
	var h struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(body, &h); err != nil {
		// Any web server answers 200 to something; a worker answers JSON.
		what := "a body that is not JSON"
		if page, ok := httputil.HTMLPage(body); ok {
			what = page
		}
		return protocol.Errorf(protocol.CodeBackendError, "rentahal health: GET /health answered 200 with %s: is the URL a RENTAHAL worker?", what)
	}
	if h.Status != "" && !strings.EqualFold(h.Status, "healthy") && !strings.EqualFold(h.Status, "ok") {
		return protocol.Errorf(protocol.CodeBackendError, "rentahal health: worker reports status %q", httputil.Clean(h.Status, maxStatus))
	}
	return nil
}

type predictRequest struct {
	Prompt    string `json:"prompt"`
	Type      string `json:"type"`
	ModelType string `json:"model_type"`
	ModelName string `json:"model_name"`
	Image     string `json:"image,omitempty"`
}

type predictResponse struct {
	Response *string `json:"response"`
}

// Run sends the query to /predict and emits the answer: one or more text
// chunks, or for imagine one image.
func (b *Backend) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	if req.GetModel() != b.model {
		return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "this rentahal worker serves model %q, not %q", b.model, req.GetModel())
	}
	typ, ok := seedType(req.GetType())
	if !ok || !b.serves(req.GetType()) {
		return backend.Usage{}, protocol.Errorf(protocol.CodeUnsupported, "this rentahal worker does not serve %s queries", protocol.TypeName(req.GetType()))
	}
	pr := predictRequest{Prompt: promptOf(req), Type: typ, ModelType: ModelType, ModelName: b.model}
	if strings.TrimSpace(pr.Prompt) == "" {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "empty prompt")
	}
	if req.GetType() == pb.QueryType_QUERY_TYPE_VISION {
		img := imageOf(req)
		if img == nil {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "a vision query needs an image attachment")
		}
		pr.Image = base64.StdEncoding.EncodeToString(img)
	}
	payload, err := json.Marshal(pr)
	if err != nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeInternal, "encode rentahal request: %v", err)
	}

	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	answer, err := b.predict(ctx, payload)
	if err != nil {
		return backend.Usage{}, err
	}
	if req.GetType() == pb.QueryType_QUERY_TYPE_IMAGINE {
		img, mime, err := decodeImage(answer)
		if err != nil {
			return backend.Usage{}, err
		}
		return backend.Usage{}, out.Media(mime, img)
	}
	return backend.Usage{}, httputil.SendText(out, answer)
}

func (b *Backend) serves(t pb.QueryType) bool {
	for _, x := range b.types {
		if x == t {
			return true
		}
	}
	return false
}

// predict posts payload and returns the "response" string.
func (b *Backend) predict(ctx context.Context, payload []byte) (string, error) {
	first := int(b.pathIdx.Load())
	for attempt := 0; attempt < 2; attempt++ {
		idx := (first + attempt) % 2
		answer, status, err := b.post(ctx, predictPaths[idx], payload)
		if err != nil {
			log.Debugw("predict failed", "worker", b.base, "path", predictPaths[idx], "err", err)
			return "", err
		}
		if status != 0 {
			if attempt == 0 {
				continue // the other spelling of the route
			}
			// Neither route exists: a misconfigured worker, not a bad request.
			return "", protocol.Errorf(protocol.CodeBackendError, "rentahal worker serves neither /predict nor /predict/ (HTTP %d)", status)
		}
		if idx != first {
			b.pathIdx.Store(int32(idx))
			log.Debugw("predict route", "worker", b.base, "path", predictPaths[idx])
		}
		return answer, nil
	}
	return "", protocol.Errorf(protocol.CodeInternal, "rentahal: predict route loop ended")
}

// wrongRoute says whether status means the worker serves the other spelling
// of the predict route (a redirect is never followed).
func wrongRoute(status int) bool {
	switch status {
	case http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return true
	}
	return false
}

// post sends payload to one spelling of the predict route. It returns the
// answer, or the status when the route is the wrong one, or a typed error.
func (b *Backend) post(ctx context.Context, path string, payload []byte) (string, int, error) {
	req, err := http.NewRequest(http.MethodPost, b.base+path, bytes.NewReader(payload))
	if err != nil {
		return "", 0, protocol.Errorf(protocol.CodeInternal, "build rentahal request: invalid worker URL")
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	// A 503 is an overloaded worker: BUSY, as for every backend, so the
	// query moves on without counting against this worker's health.
	x, err := httputil.Send(ctx, b.client, req, b.timeout, 0,
		httputil.PassStatus(http.StatusNotFound, http.StatusMethodNotAllowed))
	if err != nil {
		return "", 0, err
	}
	defer x.Close()
	switch status := x.Resp.StatusCode; {
	case wrongRoute(status):
		// Read the short answer so that the connection can serve the retry.
		_, _ = httputil.ReadAll(x, httputil.MaxErrorBody)
		return "", status, nil
	case status != http.StatusOK:
		return "", 0, x.QueryError()
	}
	var pr predictResponse
	if err := x.ReadJSON(MaxResponse, &pr); err != nil {
		return "", 0, err
	}
	if pr.Response == nil {
		return "", 0, protocol.Errorf(protocol.CodeBackendError, `rentahal worker answer has no "response" string`)
	}
	return *pr.Response, 0, nil
}

// promptOf is the prompt, or the conversation flattened into one text: the
// seed's workers take a single prompt string.
func promptOf(req *pb.QueryRequest) string {
	if p := req.GetPrompt(); strings.TrimSpace(p) != "" {
		return p
	}
	msgs := req.GetMessages()
	if len(msgs) == 1 {
		return msgs[0].GetContent()
	}
	var sb strings.Builder
	for _, m := range msgs {
		if strings.TrimSpace(m.GetContent()) == "" {
			continue
		}
		if sb.Len() > 0 {
			sb.WriteString("\n\n")
		}
		role := m.GetRole()
		if role == "" {
			role = "user"
		}
		sb.WriteString(strings.ToUpper(role[:1]) + role[1:])
		sb.WriteString(": ")
		sb.WriteString(m.GetContent())
	}
	return sb.String()
}

// imageOf is the newest image attachment: the last message's first, then
// earlier messages', then the request-level ones. Seed workers take one.
func imageOf(req *pb.QueryRequest) []byte {
	msgs := req.GetMessages()
	for i := len(msgs) - 1; i >= 0; i-- {
		for _, a := range msgs[i].GetAttachments() {
			if strings.HasPrefix(a.GetMime(), "image/") {
				return a.GetData()
			}
		}
	}
	for _, a := range req.GetAttachments() {
		if strings.HasPrefix(a.GetMime(), "image/") {
			return a.GetData()
		}
	}
	return nil
}

// decodeImage decodes an imagine answer: base64, optionally as a data URL.
func decodeImage(answer string) ([]byte, string, error) {
	s := strings.TrimSpace(answer)
	if strings.HasPrefix(s, "data:") {
		if _, after, ok := strings.Cut(s, ","); ok {
			s = after
		}
	}
	img, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		if img, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "=")); err != nil {
			return nil, "", protocol.Errorf(protocol.CodeBackendError, "rentahal worker's imagine answer is not base64")
		}
	}
	mime := http.DetectContentType(img)
	if !strings.HasPrefix(mime, "image/") {
		return nil, "", protocol.Errorf(protocol.CodeBackendError, "rentahal worker's imagine answer is not an image (%s)", mime)
	}
	if len(img) > httputil.MaxMedia {
		return nil, "", protocol.Errorf(protocol.CodeTooLarge, "image of %d bytes exceeds the %d byte media limit", len(img), httputil.MaxMedia)
	}
	return img, mime, nil
}
