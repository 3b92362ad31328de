package pathbench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// maxAnswer bounds the bytes of an answer of tokens tokens that the load
// generator reads: an event of a token is under 300 bytes on every path.
func maxAnswer(tokens int) int64 { return 64<<10 + int64(tokens)<<10 }

// Result is one path at one concurrency.
type Result struct {
	Path        string        `json:"path"`
	Concurrency int           `json:"concurrency"`
	Queries     int           `json:"queries"`
	Errors      int64         `json:"errors"`
	FirstError  string        `json:"first_error,omitempty"`
	P50         time.Duration `json:"p50_ns"`
	P99         time.Duration `json:"p99_ns"`
	TTFTP50     time.Duration `json:"ttft_p50_ns"`
	TTFTP99     time.Duration `json:"ttft_p99_ns"`
	Elapsed     time.Duration `json:"elapsed_ns"`
	// Tokens is the tokens of every answer.
	Tokens int `json:"tokens"`
	// CPU is the CPU time each measured process spent on the row.
	CPU map[string]time.Duration `json:"cpu_ns,omitempty"`
}

// QPS is the answers per second.
func (r Result) QPS() float64 { return float64(r.Queries) / r.Elapsed.Seconds() }

// Cores is the CPU time of the row's measured processes over its wall
// time: how many cores the row kept busy. On a machine with that many
// cores the row was bound by CPU, not by waiting.
func (r Result) Cores() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	var sum time.Duration
	for _, t := range r.CPU {
		sum += t
	}
	return float64(sum) / float64(r.Elapsed)
}

// CPUPerToken is proc's CPU time per streamed token of the row.
func (r Result) CPUPerToken(proc string) time.Duration {
	ok := int64(r.Queries) - r.Errors
	if ok <= 0 || r.Tokens <= 0 {
		return 0
	}
	return r.CPU[proc] / time.Duration(ok*int64(r.Tokens))
}

// Client sends chat queries to one OpenAI-compatible base URL and reads
// their streamed answers.
type Client struct {
	hc     *http.Client
	url    string
	body   []byte
	tokens int // that every answer must have
}

// ClientOption sets up a Client.
type ClientOption func(*Client)

// WithTokens asks for answers of n tokens (max_tokens), 1 to MaxTokens,
// instead of DefaultTokens.
func WithTokens(n int) ClientOption {
	return func(c *Client) { c.tokens = max(1, min(n, MaxTokens)) }
}

// NewClient queries model at base (http://host:port) with a connection
// pool large enough for conc queries at once.
func NewClient(base, model string, conc int, opts ...ClientOption) *Client {
	tr := &http.Transport{MaxIdleConns: conc, MaxIdleConnsPerHost: conc, IdleConnTimeout: time.Minute, DisableCompression: true}
	c := &Client{hc: &http.Client{Transport: tr}, url: base + "/v1/chat/completions", tokens: DefaultTokens}
	for _, o := range opts {
		o(c)
	}
	c.body = []byte(`{"model":"` + model + `","stream":true,"max_tokens":` + strconv.Itoa(c.tokens) +
		`,"messages":[{"role":"user","content":"benchmark prompt with a few words in it"}]}`)
	return c
}

// Close drops the client's idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Query sends one query and reads its answer to the end: its time to the
// first token and in total; an answer without all its tokens or without
// [DONE] is ErrIncomplete.
func (c *Client) Query(ctx context.Context) (ttft, total time.Duration, err error) {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(c.body))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, 0, fmt.Errorf("HTTP %d: %s", resp.StatusCode, b)
	}
	br := bufio.NewReaderSize(io.LimitReader(resp.Body, maxAnswer(c.tokens)), 4096)
	tokens, done := 0, false
	for {
		line, err := br.ReadSlice('\n')
		if n := bytes.Count(line, []byte(Token)); n > 0 {
			if tokens == 0 {
				ttft = time.Since(start)
			}
			tokens += n
		}
		if bytes.HasPrefix(line, []byte("data: [DONE]")) {
			done = true
		}
		if err == io.EOF {
			break
		}
		if err != nil && err != bufio.ErrBufferFull {
			return 0, 0, err
		}
	}
	total = time.Since(start)
	if tokens != c.tokens || !done {
		return 0, 0, fmt.Errorf("%w: %d of %d tokens, [DONE] %v", ErrIncomplete, tokens, c.tokens, done)
	}
	return ttft, total, nil
}

// Run sends queries queries, conc at a time, and times them.
func (c *Client) Run(ctx context.Context, queries, conc int) Result {
	total := make([]time.Duration, 0, queries)
	ttft := make([]time.Duration, 0, queries)
	var mu sync.Mutex
	var next, errs atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	start := time.Now()
	for range conc {
		wg.Go(func() {
			for int(next.Add(1)) <= queries && ctx.Err() == nil {
				qctx, cancel := context.WithTimeout(ctx, time.Minute)
				t1, t, err := c.Query(qctx)
				cancel()
				if err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				mu.Lock()
				total, ttft = append(total, t), append(ttft, t1)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	r := Result{Concurrency: conc, Queries: queries, Errors: errs.Load(), Elapsed: time.Since(start), Tokens: c.tokens}
	if e, ok := firstErr.Load().(string); ok {
		r.FirstError = e
	}
	r.P50, r.P99 = percentile(total, 50), percentile(total, 99)
	r.TTFTP50, r.TTFTP99 = percentile(ttft, 50), percentile(ttft, 99)
	return r
}

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[min(len(d)-1, len(d)*p/100)]
}
