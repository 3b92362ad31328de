// Package detect finds model servers already running on this machine, for a
// node started without --backend. It only reports what answers; building the
// backends (ollama.New, openai.New) is the caller's business.
//
// Every candidate is probed at once, over loopback only (the dialer refuses
// any other address), within one short deadline (DefaultTimeout in all).
// A candidate counts as found when its model list answers 200 with the
// documented JSON shape; anything else (nothing listening, 404, an HTML
// page, a list in another shape) is not found.
//
// Default candidates (DefaultCandidates):
//
//	ollama  127.0.0.1:11434  GET /api/tags   Ollama
//	openai  127.0.0.1:8080   GET /v1/models  llama.cpp llama-server, llamafile, LocalAI
//	openai  127.0.0.1:8000   GET /v1/models  vLLM
//	openai  127.0.0.1:1234   GET /v1/models  LM Studio
//	openai  127.0.0.1:5000   GET /v1/models  text-generation-webui (--api)
//	openai  127.0.0.1:5001   GET /v1/models  KoboldCpp
//	openai  127.0.0.1:1337   GET /v1/models  Jan
//	openai  127.0.0.1:4891   GET /v1/models  GPT4All
//	openai  127.0.0.1:30000  GET /v1/models  SGLang
//
// Proxies that forward to hosted, paid APIs (LiteLLM on 4000, for one) are
// left out on purpose: a volunteer should choose to share those explicitly.
// An mtor bridge also serves /v1/models; a server that identifies itself as
// mtor (see isMtor) is skipped so that a node never serves the swarm back to
// itself.
package detect

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	logging "github.com/ipfs/go-log/v2"
)

var log = logging.Logger("mtor/backend/detect")

const (
	// DefaultTimeout bounds the whole detection.
	DefaultTimeout = 700 * time.Millisecond
	// maxBody bounds one model list.
	maxBody = 1 << 20
	// maxModels bounds the names kept per server.
	maxModels = 256
)

// Backend kinds detection can report.
const (
	KindOllama = "ollama"
	KindOpenAI = "openai"
)

// Candidate is a place a model server may listen.
type Candidate struct {
	Kind string // KindOllama or KindOpenAI
	URL  string // base URL, e.g. http://127.0.0.1:11434
	Note string // which servers usually listen there, for people
}

// Found is a model server that answered.
type Found struct {
	Kind   string   // KindOllama or KindOpenAI
	URL    string   // base URL, as in the candidate
	Note   string   // the candidate's note
	Models []string // model names it listed (possibly none)
}

func (f Found) String() string {
	return fmt.Sprintf("%s=%s (%s, %d models)", f.Kind, f.URL, f.Note, len(f.Models))
}

// DefaultCandidates lists the well-known local ports (see the package doc).
func DefaultCandidates() []Candidate {
	return []Candidate{
		{KindOllama, "http://127.0.0.1:11434", "Ollama"},
		{KindOpenAI, "http://127.0.0.1:8080", "llama.cpp server, llamafile or LocalAI"},
		{KindOpenAI, "http://127.0.0.1:8000", "vLLM"},
		{KindOpenAI, "http://127.0.0.1:1234", "LM Studio"},
		{KindOpenAI, "http://127.0.0.1:5000", "text-generation-webui"},
		{KindOpenAI, "http://127.0.0.1:5001", "KoboldCpp"},
		{KindOpenAI, "http://127.0.0.1:1337", "Jan"},
		{KindOpenAI, "http://127.0.0.1:4891", "GPT4All"},
		{KindOpenAI, "http://127.0.0.1:30000", "SGLang"},
	}
}

type config struct {
	candidates []Candidate
	timeout    time.Duration
}

// Option configures Detect.
type Option func(*config)

// WithCandidates replaces the candidate list (tests, or a node configured
// with other ports). Candidates on non-loopback hosts are never probed.
func WithCandidates(c ...Candidate) Option {
	return func(cfg *config) { cfg.candidates = append([]Candidate(nil), c...) }
}

// WithTimeout bounds the whole detection.
func WithTimeout(d time.Duration) Option { return func(cfg *config) { cfg.timeout = d } }

// Detect probes every candidate in parallel and returns those that answered,
// in candidate order. It never fails: a candidate that errs is not found.
func Detect(ctx context.Context, opts ...Option) []Found {
	cfg := config{candidates: DefaultCandidates(), timeout: DefaultTimeout}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()

	transport := &http.Transport{
		Proxy:             nil, // loopback only, never through a proxy
		DialContext:       (&net.Dialer{Control: loopbackOnly}).DialContext,
		DisableKeepAlives: true,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{
		Transport:     transport,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	results := make([]*Found, len(cfg.candidates))
	seen := make(map[string]bool)
	var wg sync.WaitGroup
	for i, c := range cfg.candidates {
		key := c.Kind + " " + strings.TrimRight(c.URL, "/")
		if seen[key] {
			continue
		}
		seen[key] = true
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := probe(ctx, client, c)
			if err != nil {
				log.Debugw("not found", "kind", c.Kind, "url", c.URL, "reason", err)
				return
			}
			results[i] = f
		}()
	}
	wg.Wait()
	var out []Found
	for _, f := range results {
		if f != nil {
			out = append(out, *f)
		}
	}
	return out
}

var errNotLoopback = errors.New("not a loopback address")

// loopbackOnly refuses to dial anything but 127.0.0.0/8 and ::1.
func loopbackOnly(_, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("detect: %s: %w", address, errNotLoopback)
	}
	return nil
}

func probe(ctx context.Context, client *http.Client, c Candidate) (*Found, error) {
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("bad candidate URL %q", c.URL)
	}
	// Checked before any lookup, so a wrong candidate never even causes a
	// DNS query; the dialer checks again.
	if h := u.Hostname(); h != "localhost" {
		if ip := net.ParseIP(h); ip == nil || !ip.IsLoopback() {
			return nil, fmt.Errorf("candidate %q: %w", c.URL, errNotLoopback)
		}
	}
	base := strings.TrimRight(u.String(), "/")
	var path string
	switch c.Kind {
	case KindOllama:
		path = "/api/tags"
	case KindOpenAI:
		path = "/v1/models"
	default:
		return nil, fmt.Errorf("unknown kind %q", c.Kind)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxBody {
		return nil, fmt.Errorf("model list over %d bytes", maxBody)
	}
	var names []string
	switch c.Kind {
	case KindOllama:
		names, err = ollamaModels(body)
	case KindOpenAI:
		if isMtor(resp.Header, body) {
			return nil, errors.New("an mtor bridge, not a model server")
		}
		names, err = openaiModels(body)
	}
	if err != nil {
		return nil, err
	}
	return &Found{Kind: c.Kind, URL: base, Note: c.Note, Models: names}, nil
}

// ollamaModels parses GET /api/tags: {"models": [{"name": ...}, ...]}.
func ollamaModels(body []byte) ([]string, error) {
	var tags struct {
		Models *[]struct {
			Name  string `json:"name"`
			Model string `json:"model"`
		} `json:"models"`
	}
	if err := json.Unmarshal(body, &tags); err != nil {
		return nil, fmt.Errorf("not an Ollama tag list: %w", err)
	}
	if tags.Models == nil {
		return nil, errors.New(`not an Ollama tag list: no "models"`)
	}
	var names []string
	for _, m := range *tags.Models {
		n := m.Name
		if n == "" {
			n = m.Model
		}
		if n != "" && len(names) < maxModels {
			names = append(names, n)
		}
	}
	return names, nil
}

// openaiModels parses GET /v1/models: {"object": "list", "data": [{"id": ...}]}.
func openaiModels(body []byte) ([]string, error) {
	var list struct {
		Data *[]struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("not an OpenAI model list: %w", err)
	}
	if list.Data == nil {
		return nil, errors.New(`not an OpenAI model list: no "data"`)
	}
	var names []string
	for _, m := range *list.Data {
		if m.ID != "" && len(names) < maxModels {
			names = append(names, m.ID)
		}
	}
	return names, nil
}

// isMtor recognises an mtor bridge: a Server header naming mtor, an
// X-Mtor-* response header, or models listed with mtor's own extension
// field or owner ("mtor swarm").
func isMtor(h http.Header, body []byte) bool {
	if strings.HasPrefix(strings.ToLower(h.Get("Server")), "mtor") {
		return true
	}
	for k := range h {
		if strings.HasPrefix(strings.ToLower(k), "x-mtor-") {
			return true
		}
	}
	var list struct {
		Data []struct {
			OwnedBy string          `json:"owned_by"`
			Mtor    json.RawMessage `json:"mtor"`
		} `json:"data"`
	}
	if json.Unmarshal(body, &list) == nil {
		for _, m := range list.Data {
			if m.Mtor != nil || strings.HasPrefix(m.OwnedBy, "mtor") {
				return true
			}
		}
	}
	return false
}
