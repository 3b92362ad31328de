package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	golog "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

const (
	defaultQueryTimeout = 2 * time.Minute
	defaultPeerWait     = 30 * time.Second
	maxStdinPrompt      = 1 << 20
	maxAttachment       = 6 << 20 // below the 8 MiB request frame, with room for the rest
)

// Listen addresses of the temporary node of "query --join": random ports.
const (
	ephemeralTCP  = "/ip4/0.0.0.0/tcp/0"
	ephemeralQUIC = "/ip4/0.0.0.0/udp/0/quic-v1"
)

type queryFlags struct {
	apiAddr   string
	join      stringList
	swarm     string
	listen    stringList
	model     string
	typ       string
	json      bool
	timeout   time.Duration
	wait      time.Duration
	maxTokens uint
	system    string
	attach    stringList
	out       string
	prefer    string
}

// restartNotice goes to stderr when the peer answering is lost mid-answer
// and the answer starts again on another peer.
const restartNotice = "[mtor: the peer answering was lost mid-answer; the text above is incomplete, the complete answer follows from another peer]"

// queryOutput is what --json prints: one object at the end.
type queryOutput struct {
	Peer          string           `json:"peer"`
	Local         bool             `json:"local"`
	Model         string           `json:"model"`
	Type          string           `json:"type"`
	Text          string           `json:"text"`
	Media         []api.MediaEvent `json:"media,omitempty"`
	Embeddings    [][]float32      `json:"embeddings,omitempty"`
	TTFTMs        uint32           `json:"ttft_ms"`
	TotalMs       uint32           `json:"total_ms"`
	QueueMs       uint32           `json:"queue_ms"`
	Usage         api.Usage        `json:"usage"`
	EnergyMJ      uint64           `json:"energy_mj"`
	Attempts      int              `json:"attempts"`
	Continued     int              `json:"continued,omitempty"`
	WorkerVersion string           `json:"worker_version"`
	// Receipt is the countersigned receipt, base64 of its protobuf
	// (docs/protocol.md §6.4).
	Receipt []byte `json:"receipt,omitempty"`
}

// querier is where a query goes: a node's control API, or a temporary
// node of our own.
type querier interface {
	Models(ctx context.Context) ([]router.ModelView, error)
	Query(ctx context.Context, q *api.QueryRequest, onEvent func(*api.Event) error) (*api.DoneEvent, error)
}

func runQuery(ctx context.Context, e *env, args []string) error {
	var f queryFlags
	fs := newFlagSet(e, "query", "[--api HOST:PORT | --join ADDR] [--model M] [--type T] [--json] PROMPT")
	fs.StringVar(&f.apiAddr, "api", defaultAPIAddr(e), "control API of a running node (env MTOR_API)")
	fs.Var(&f.join, "join", "instead of --api: join the swarm through this multiaddr or token with a temporary node, repeatable")
	fs.StringVar(&f.swarm, "swarm", "", "with --join and a plain multiaddr: the swarm name")
	fs.Var(&f.listen, "listen", "with --join: listen address of the temporary node, repeatable (default random TCP and QUIC ports)")
	fs.StringVar(&f.model, "model", "", "model to ask (default: the model most peers serve for the type)")
	fs.StringVar(&f.typ, "type", "chat", "query type: chat, vision, imagine, stt, tts, embed")
	fs.BoolVar(&f.json, "json", false, "print one JSON object at the end instead of streaming text")
	fs.DurationVar(&f.timeout, "timeout", defaultQueryTimeout, "deadline of the query")
	fs.DurationVar(&f.wait, "wait", defaultPeerWait, "with --join: how long to wait for a peer that serves the model")
	fs.UintVar(&f.maxTokens, "max-tokens", 0, "most tokens to generate (0: the backend's default)")
	fs.StringVar(&f.system, "system", "", "system prompt")
	fs.Var(&f.attach, "attach", "file to attach (an image for vision, audio for stt), repeatable")
	fs.StringVar(&f.out, "out", "", "write media output (imagine, tts) to this file")
	fs.StringVar(&f.prefer, "prefer", "", "how the worker is picked: energy (lowest measured joules per token within the latency slack) or latency (default: the node's --prefer-energy)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	apiSet := false
	fs.Visit(func(fl *flag.Flag) { apiSet = apiSet || fl.Name == "api" })
	if apiSet && len(f.join) > 0 {
		return usagef("--api and --join exclude each other")
	}
	if len(f.join) == 0 && (f.swarm != "" || len(f.listen) > 0) {
		return usagef("--swarm and --listen need --join")
	}
	if err := checkNetFlags(f.swarm, f.join, f.listen); err != nil {
		return err
	}
	if len(pos) == 0 {
		return usagef("a PROMPT is needed (use - to read it from stdin)")
	}
	if f.timeout <= 0 || f.timeout > api.MaxQueryTimeout {
		return usagef("--timeout must be in (0, %s]", api.MaxQueryTimeout)
	}
	typ, err := protocol.ParseType(f.typ)
	if err != nil {
		return usagef("--type: %s", protocol.AsError(err).Message)
	}
	if _, err := router.ParseEnergyPreference(f.prefer); err != nil {
		return usagef("--prefer: %v", err)
	}
	prompt := strings.Join(pos, " ")
	if prompt == "-" {
		b, err := io.ReadAll(io.LimitReader(e.stdin, maxStdinPrompt+1))
		if err != nil {
			return fmt.Errorf("reading the prompt from stdin: %w", err)
		}
		if len(b) > maxStdinPrompt {
			return fmt.Errorf("the prompt on stdin is over %d bytes", maxStdinPrompt)
		}
		prompt = strings.TrimSpace(string(b))
	}
	q, err := f.request(typ, prompt)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var target querier
	if len(f.join) > 0 {
		eph, err := startEphemeral(ctx, e, &f)
		if err != nil {
			return err
		}
		defer eph.close()
		// A join address that does not answer is the error, not that no
		// model appeared afterwards.
		if err := eph.n.WaitJoined(ctx); err != nil {
			return fmt.Errorf("could not connect to the swarm: %w", err)
		}
		if q.Model == "" || !hasModel(eph.n.Router().Models(), q.Model, typ) {
			if err := eph.waitForModel(ctx, q.Model, typ, f.wait); err != nil && q.Model == "" {
				return err
			}
			// A named model not yet in the peer table may still be found
			// by the router through the DHT: try anyway.
		}
		target = eph
	} else {
		target = api.NewClient(f.apiAddr)
	}

	if q.Model == "" {
		models, err := target.Models(ctx)
		if err != nil {
			return explain(err, f.apiAddr)
		}
		q.Model = pickModel(models, typ)
		if q.Model == "" {
			return fmt.Errorf("no peer in the swarm serves %s queries yet (mtor peers shows what is served)", protocol.TypeName(typ))
		}
	}

	out := queryOutput{Model: q.Model, Type: protocol.TypeName(typ)}
	var text strings.Builder
	var audio protocol.Audio // tts: the Media pieces, joined
	done, err := target.Query(ctx, q, func(ev *api.Event) error {
		switch ev.Event {
		case api.EventRestart:
			// The worker died mid-answer; the answer starts again elsewhere.
			// Streamed text cannot be taken back: end its line, so that the
			// complete answer starts on a line of its own, and say so.
			if !f.json {
				if t := text.String(); t != "" && !strings.HasSuffix(t, "\n") {
					fmt.Fprintln(e.stdout)
				}
				fmt.Fprintln(e.stderr, restartNotice)
			}
			text.Reset()
			out.Media, out.Embeddings, audio = nil, nil, protocol.Audio{}
		case api.EventChunk:
			text.WriteString(ev.Text)
			if !f.json {
				_, err := io.WriteString(e.stdout, ev.Text)
				return err
			}
		case api.EventMedia:
			if typ != pb.QueryType_QUERY_TYPE_TTS {
				out.Media = append(out.Media, *ev.MediaEvent)
			} else if !audio.Add(ev.MIME, ev.Data) {
				return protocol.Errorf(protocol.CodeBackendError, "the worker returned audio pieces of different formats")
			}
		case api.EventEmbedding:
			out.Embeddings = append(out.Embeddings, ev.Vector)
		}
		return nil
	})
	if err != nil {
		return explain(err, f.apiAddr)
	}
	out.Text = text.String()
	if audio.Pieces > 0 {
		out.Media = []api.MediaEvent{{MIME: audio.Mime, Data: audio.Data}}
	}
	out.fill(done)
	if f.out != "" && len(out.Media) > 0 {
		if err := os.WriteFile(f.out, out.Media[0].Data, 0o644); err != nil {
			return fmt.Errorf("writing --out: %w", err)
		}
	}
	if f.json {
		enc := json.NewEncoder(e.stdout)
		return enc.Encode(out)
	}
	return printPlain(e, &out, f.out)
}

// request builds the API request from the flags.
func (f *queryFlags) request(typ pb.QueryType, prompt string) (*api.QueryRequest, error) {
	q := &api.QueryRequest{
		Model:     f.model,
		Type:      protocol.TypeName(typ),
		TimeoutMs: f.timeout.Milliseconds(),
		Prefer:    f.prefer,
	}
	if f.maxTokens > 0 {
		q.Params = &api.Params{MaxTokens: uint32(f.maxTokens)}
	}
	var atts []api.Attachment
	for _, path := range f.attach {
		a, err := readAttachment(path)
		if err != nil {
			return nil, err
		}
		atts = append(atts, a)
	}
	switch {
	case typ == pb.QueryType_QUERY_TYPE_EMBED:
		q.Inputs = []string{prompt}
	case f.system != "" || typ == pb.QueryType_QUERY_TYPE_VISION:
		if f.system != "" {
			q.Messages = append(q.Messages, api.Message{Role: "system", Content: f.system})
		}
		q.Messages = append(q.Messages, api.Message{Role: "user", Content: prompt, Attachments: atts})
		atts = nil
	default:
		q.Prompt = prompt
	}
	q.Attachments = atts
	return q, nil
}

func readAttachment(path string) (api.Attachment, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return api.Attachment{}, fmt.Errorf("--attach: %w", err)
	}
	if fi.Size() > maxAttachment {
		return api.Attachment{}, fmt.Errorf("--attach %s: %d bytes, limit %d", path, fi.Size(), maxAttachment)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return api.Attachment{}, fmt.Errorf("--attach: %w", err)
	}
	mt := mime.TypeByExtension(filepath.Ext(path))
	if mt == "" {
		mt = http.DetectContentType(data)
	}
	if i := strings.IndexByte(mt, ';'); i >= 0 {
		mt = mt[:i]
	}
	return api.Attachment{MIME: mt, Data: data}, nil
}

func (o *queryOutput) fill(d *api.DoneEvent) {
	o.Peer = d.Peer
	o.Local = d.Local
	if d.Model != "" {
		o.Model = d.Model
	}
	o.TTFTMs = d.TTFTMs
	o.TotalMs = d.TotalMs
	o.QueueMs = d.QueueMs
	o.Usage = d.Usage
	o.EnergyMJ = d.EnergyMJ
	o.Attempts = d.Attempts
	o.Continued = d.Continued
	o.WorkerVersion = d.WorkerVersion
	o.Receipt = d.Receipt
}

// printPlain finishes the streamed text and says who answered on stderr,
// so that stdout holds only the answer.
func printPlain(e *env, o *queryOutput, outFile string) error {
	if o.Text != "" && !strings.HasSuffix(o.Text, "\n") {
		fmt.Fprintln(e.stdout)
	}
	for _, v := range o.Embeddings {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "%s\n", b)
	}
	for _, m := range o.Media {
		if outFile != "" {
			fmt.Fprintf(e.stderr, "%s, %d bytes, written to %s\n", m.MIME, len(m.Data), outFile)
			outFile = "" // only the first is written
		} else {
			fmt.Fprintf(e.stderr, "%s, %d bytes (use --out FILE to save it, or --json)\n", m.MIME, len(m.Data))
		}
	}
	where := "peer " + o.Peer
	if o.Local {
		where = "this node"
	}
	fmt.Fprintf(e.stderr, "(%s from %s: first output after %d ms, %d ms in all", o.Model, where, o.TTFTMs, o.TotalMs)
	if o.EnergyMJ > 0 {
		fmt.Fprintf(e.stderr, ", %.1f J", float64(o.EnergyMJ)/1000)
	}
	fmt.Fprintln(e.stderr, ")")
	return nil
}

// explain makes an error of the client readable on one line.
func explain(err error, apiAddr string) error {
	if errors.Is(err, api.ErrUnreachable) {
		cause := err
		var op *net.OpError
		if errors.As(err, &op) {
			cause = op
		}
		return fmt.Errorf("cannot reach a node's control API at %s: is `mtor node` running? (%v)", apiAddr, cause)
	}
	return err
}

// pickModel chooses the model that most peers serve for typ; ties go to
// the first name in order, so that the choice is stable.
func pickModel(models []router.ModelView, typ pb.QueryType) string {
	want := protocol.TypeName(typ)
	var cands []router.ModelView
	for _, m := range models {
		for _, t := range m.Types {
			if t == want {
				cands = append(cands, m)
				break
			}
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].Peers != cands[j].Peers {
			return cands[i].Peers > cands[j].Peers
		}
		return cands[i].Name < cands[j].Name
	})
	if len(cands) == 0 {
		return ""
	}
	return cands[0].Name
}

func hasModel(models []router.ModelView, name string, typ pb.QueryType) bool {
	want := protocol.TypeName(typ)
	for _, m := range models {
		if m.Name != name || m.Peers == 0 {
			continue
		}
		for _, t := range m.Types {
			if t == want {
				return true
			}
		}
	}
	return false
}

// ephemeral is a temporary node that joins a swarm for one query: no
// backends, no mDNS, a throwaway identity.
type ephemeral struct {
	n   *node.Node
	dir string
}

func startEphemeral(ctx context.Context, e *env, f *queryFlags) (*ephemeral, error) {
	if e.getenv("GOLOG_LOG_LEVEL") == "" {
		// A one-shot command says its own errors in one line; go-libp2p's
		// swarm may log a listener's close racing its accept loop as an
		// error ("swarm listener accept error ... listener closed"),
		// which would print a second, meaningless line.
		_ = golog.SetLogLevel("swarm2", "fatal")
	}
	dir, err := os.MkdirTemp("", "mtor-query-")
	if err != nil {
		return nil, fmt.Errorf("temporary node: %w", err)
	}
	listen := []string(f.listen)
	if len(listen) == 0 {
		listen = []string{ephemeralTCP, ephemeralQUIC}
	}
	opts := []node.Option{
		node.WithDataDir(dir),
		node.WithListenAddrs(listen...),
		node.WithJoin(f.join...),
		node.WithMDNS(false),
	}
	if f.swarm != "" {
		opts = append(opts, node.WithSwarm(f.swarm))
	}
	n, err := node.New(ctx, opts...)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("joining the swarm: %w", err)
	}
	return &ephemeral{n: n, dir: dir}, nil
}

func (p *ephemeral) close() {
	_ = p.n.Close()
	_ = os.RemoveAll(p.dir)
}

// waitForModel waits until the peer table holds a peer serving model (any
// model when "") for typ, or until wait is over.
func (p *ephemeral) waitForModel(ctx context.Context, model string, typ pb.QueryType, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		models := p.n.Router().Models()
		if model == "" && pickModel(models, typ) != "" || model != "" && hasModel(models, model, typ) {
			return nil
		}
		select {
		case <-ctx.Done():
			what := "a model"
			if model != "" {
				what = fmt.Sprintf("model %q", model)
			}
			return fmt.Errorf("no peer serving %s for %s queries appeared within %s", what, protocol.TypeName(typ), wait)
		case <-tick.C:
		}
	}
}

func (p *ephemeral) Models(ctx context.Context) ([]router.ModelView, error) {
	return p.n.Router().Models(), nil
}

func (p *ephemeral) Query(ctx context.Context, q *api.QueryRequest, onEvent func(*api.Event) error) (*api.DoneEvent, error) {
	req, timeout, err := q.Proto(defaultQueryTimeout)
	if err != nil {
		return nil, err
	}
	pref, err := q.Preference()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(router.WithEnergyPreference(ctx, pref), timeout)
	defer cancel()
	return api.Run(ctx, p.n.Router(), req, onEvent)
}
