// Package enginetest runs a real inference engine for tests: llama.cpp through
// the npm package node-llama-cpp, behind shim.mjs, a small HTTP shim that
// speaks the OpenAI-compatible API and Ollama's native API, loading a tiny
// random-weight GGUF model written by package gguf. Its output is gibberish;
// streaming, timing, cancellation and concurrency are real.
//
// Install once with `npm ci` in this directory (.ci/run does). Without
// node_modules a test that starts an engine is skipped, unless the CI
// environment variable is set, where it fails.
//
//	e := enginetest.Start(t)
//	b, _ := ollama.New(e.URL())
//	... query e.Model() ...
package enginetest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/enginetest/gguf"
)

// DefaultModel is the model name the engine serves unless told otherwise.
const DefaultModel = "tiny"

// startTimeout bounds loading the model and printing the port; generous
// for a loaded 2-core machine.
const startTimeout = 2 * time.Minute

// Dir is the directory holding shim.mjs and node_modules.
func Dir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "node/enginetest"
	}
	return filepath.Dir(file)
}

// Available reports why the engine cannot run here, or nil when it can.
func Available() error {
	if _, err := exec.LookPath("node"); err != nil {
		return fmt.Errorf("node is not installed: %w", err)
	}
	if _, err := os.Stat(filepath.Join(Dir(), "node_modules", "node-llama-cpp", "package.json")); err != nil {
		return fmt.Errorf("node-llama-cpp is not installed: run `npm ci` in %s", Dir())
	}
	return nil
}

// Config is how to start an engine.
type Config struct {
	Model     string      // served model name; default DefaultModel
	Sequences int         // parallel generations; default 4
	Context   int         // context size per sequence; default 2048
	GGUF      gguf.Config // the random model's shape
	Stderr    io.Writer   // the shim's log; default discarded
}

// Option changes the Config.
type Option func(*Config)

// WithModelName sets the served model name.
func WithModelName(name string) Option { return func(c *Config) { c.Model = name } }

// WithSequences sets how many generations run in parallel; more wait.
func WithSequences(n int) Option { return func(c *Config) { c.Sequences = n } }

// WithGGUF sets the random model's shape.
func WithGGUF(g gguf.Config) Option { return func(c *Config) { c.GGUF = g } }

// WithStderr sends the shim's log to w.
func WithStderr(w io.Writer) Option { return func(c *Config) { c.Stderr = w } }

// Engine is a running shim process.
type Engine struct {
	url   string
	model string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{} // closed when the process has exited
	once  sync.Once
}

// Start launches an engine for a test, in t.TempDir(), and stops it when
// the test ends. It skips the test when the engine is not installed and CI
// is unset; under CI it fails the test instead.
func Start(t testing.TB, opts ...Option) *Engine {
	t.Helper()
	Require(t)
	log := &tailBuffer{max: 16 << 10}
	opts = append([]Option{WithStderr(log)}, opts...)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	e, err := Launch(ctx, t.TempDir(), opts...)
	if err != nil {
		t.Fatalf("start engine: %v\nengine log:\n%s", err, log.String())
	}
	t.Cleanup(func() {
		e.Close()
		if t.Failed() {
			t.Logf("engine log (tail):\n%s", log.String())
		}
	})
	return e
}

// Require skips the test when the engine is not installed and the CI
// environment variable is unset; under CI it fails the test instead,
// because CI installs the engine.
func Require(t testing.TB) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("real inference engine unavailable (%v); CI installs it", err)
		}
		t.Fatalf("real inference engine unavailable under CI: %v", err)
	}
}

// Launch writes the model into dir and starts the shim; Close stops it.
func Launch(ctx context.Context, dir string, opts ...Option) (*Engine, error) {
	cfg := Config{Model: DefaultModel, Sequences: 4, Context: 2048}
	for _, o := range opts {
		o(&cfg)
	}
	path := filepath.Join(dir, "model.gguf")
	if err := gguf.WriteFile(path, cfg.GGUF); err != nil {
		return nil, err
	}
	cmd := exec.Command("node", "shim.mjs", "--model", path, "--name", cfg.Model,
		"--sequences", strconv.Itoa(cfg.Sequences), "--context", strconv.Itoa(cfg.Context))
	cmd.Dir = Dir()
	cmd.Stderr = cfg.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("engine stdin: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("engine stdout: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start node: %w", err)
	}
	e := &Engine{model: cfg.Model, cmd: cmd, stdin: stdin, done: make(chan struct{})}
	port := make(chan string, 1)
	go func() {
		// The first line is the port; the rest is drained so the shim
		// never blocks on a full pipe.
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		port <- strings.TrimSpace(line)
		_, _ = io.Copy(io.Discard, r)
		_ = cmd.Wait()
		close(e.done)
	}()
	select {
	case p := <-port:
		if _, err := strconv.Atoi(p); err != nil {
			e.Close()
			return nil, fmt.Errorf("engine exited or printed %q instead of its port", p)
		}
		e.url = "http://127.0.0.1:" + p
		return e, nil
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("engine did not print its port: %w", ctx.Err())
	}
}

// URL is the engine's base URL, http://127.0.0.1:PORT, for both APIs.
func (e *Engine) URL() string { return e.url }

// Model is the name of the model it serves.
func (e *Engine) Model() string { return e.model }

// Kill ends the engine at once (SIGKILL), as a crash would, and waits for
// it to be gone.
func (e *Engine) Kill() {
	_ = e.cmd.Process.Kill()
	<-e.done
}

// Close stops the engine gracefully (closing its stdin), killing it if it
// has not exited within 10 s. Safe to call more than once.
func (e *Engine) Close() {
	e.once.Do(func() {
		_ = e.stdin.Close()
		select {
		case <-e.done:
		case <-time.After(10 * time.Second):
			e.Kill()
		}
	})
}

// Stats are the shim's counters: HTTP requests, generations started,
// completed and aborted (client gone), generations running now, tokens
// generated.
type Stats struct {
	Requests  int `json:"requests"`
	Started   int `json:"started"`
	Completed int `json:"completed"`
	Aborted   int `json:"aborted"`
	Active    int `json:"active"`
	Tokens    int `json:"tokens"`
}

// Stats reads the counters now.
func (e *Engine) Stats(ctx context.Context) (Stats, error) {
	return e.getStats(ctx, e.url+"/debug/stats")
}

// WaitStat waits, without polling, until the counter named field (the JSON
// name: started, completed, aborted, active, ...) reaches at least min, or
// ctx ends.
func (e *Engine) WaitStat(ctx context.Context, field string, min int) (Stats, error) {
	timeout := 60 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	q := url.Values{"field": {field}, "min": {strconv.Itoa(min)}, "timeout_ms": {strconv.FormatInt(timeout.Milliseconds(), 10)}}
	return e.getStats(ctx, e.url+"/debug/wait?"+q.Encode())
}

func (e *Engine) getStats(ctx context.Context, u string) (Stats, error) {
	var s Stats
	err := e.getJSON(ctx, u, 1<<16, &s)
	if err != nil {
		return s, fmt.Errorf("engine stats: %w (now %+v)", err, s)
	}
	return s, nil
}

// Generation is one generation the engine ran: Prefix is the final
// assistant message it was asked to continue ("" for a new answer), Text
// what it wrote after it, Reason why it ended (length, stop, abort).
type Generation struct {
	Prefix string `json:"prefix"`
	Text   string `json:"text"`
	Reason string `json:"reason"`
	// Stop is the engine's own stop reason (node-llama-cpp's), Tokens
	// how many it generated.
	Stop   string `json:"stop,omitempty"`
	Tokens int    `json:"tokens,omitempty"`
}

// Generations lists the engine's last generations (at most 256), oldest
// first.
func (e *Engine) Generations(ctx context.Context) ([]Generation, error) {
	var g []Generation
	if err := e.getJSON(ctx, e.url+"/debug/generations", 16<<20, &g); err != nil {
		return nil, fmt.Errorf("engine generations: %w", err)
	}
	return g, nil
}

func (e *Engine) getJSON(ctx context.Context, u string, limit int64, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, limit)).Decode(v); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s", resp.Status)
	}
	return nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf.Write(p)
	if over := b.buf.Len() - b.max; over > 0 {
		b.buf.Next(over)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
