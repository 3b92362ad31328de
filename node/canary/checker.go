// Package canary runs honesty spot checks: now and then the same query
// (a canary), with one seed and temperature 0, goes to several workers
// announcing the same model, and their answers are compared. A worker
// whose answer disagrees with the majority (or with this node's own
// worker, a trusted reference) loses reputation; the router weighs peers
// by it and leaves out those below a threshold. Canaries are ordinary
// queries on the wire: same protocol, random ids, prompts like a user's.
// docs/security.md says what this can and cannot catch.
package canary

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/canary")

// Scheduling defaults: one canary query per 50 routed queries, at most
// one round a minute, sent to up to 5 workers; a round waits 2 minutes
// at most for its answers.
const (
	DefaultRate      = 0.02
	DefaultInterval  = time.Minute
	DefaultFanout    = 5
	DefaultMinVoters = 3
	DefaultMaxTokens = 24
	DefaultTimeout   = 2 * time.Minute
	// Bounds of what is kept of one answer.
	maxAnswerText  = 16 << 10
	maxAnswerMedia = 16 << 20
)

// ErrTooFew is returned by Round when too few workers serve the model
// for a verdict.
var ErrTooFew = errors.New("canary: too few workers announce the model")

// ErrUncheckable is returned by Round for a query type canaries do not
// cover (vision, speech).
var ErrUncheckable = errors.New("canary: query type not checked")

// Prober is what a round needs of the router.
type Prober interface {
	Self() peer.ID
	Models() []router.ModelView
	CanaryPeers(model string, t pb.QueryType) []peer.ID
	QueryPeer(ctx context.Context, p peer.ID, req *pb.QueryRequest, h router.Handler) (*router.Result, error)
}

// Checker schedules canary rounds and records their verdicts in a Book.
type Checker struct {
	book      *Book
	th        Thresholds
	rate      float64
	interval  time.Duration
	verify    bool
	fanout    int
	minVoters int
	maxTokens uint32
	timeout   time.Duration

	wake chan struct{}

	mu      sync.Mutex
	budget  float64 // canary queries the routed traffic has paid for; < 0: owed
	running bool    // a traffic-driven round is under way
	last    time.Time
	pending *target
	rng     *mrand.Rand
	stats   Counters
}

type target struct {
	model string
	t     pb.QueryType
}

// Counters are what a checker has done so far.
type Counters struct {
	Rounds     int // rounds run
	Queries    int // canary queries sent
	Conclusive int // rounds with a verdict
	Disagreed  int // verdicts against a worker
}

// Option configures a Checker.
type Option func(*Checker)

// WithRate sets the share of canary queries to routed queries (0 turns
// traffic-driven canaries off), at most 1.
func WithRate(r float64) Option {
	return func(c *Checker) {
		if r >= 0 && r <= 1 {
			c.rate = r
		}
	}
}

// WithInterval sets the least time between two rounds; with WithVerify,
// the time between rounds.
func WithInterval(d time.Duration) Option {
	return func(c *Checker) {
		if d > 0 {
			c.interval = d
		}
	}
}

// WithVerify makes the checker run a round every interval whatever the
// traffic, on a model picked at random: the --verify role of a
// volunteer that spends its own queries on checking others.
func WithVerify(on bool) Option { return func(c *Checker) { c.verify = on } }

// WithFanout sets how many workers one round asks, at least 3.
func WithFanout(n int) Option {
	return func(c *Checker) {
		if n >= 3 {
			c.fanout = n
		}
	}
}

// WithThresholds sets when answers agree.
func WithThresholds(th Thresholds) Option { return func(c *Checker) { c.th = th } }

// WithRoundTimeout bounds one round.
func WithRoundTimeout(d time.Duration) Option {
	return func(c *Checker) {
		if d > 0 {
			c.timeout = d
		}
	}
}

// New returns a checker recording into book.
func New(book *Book, opts ...Option) *Checker {
	var s [16]byte
	_, _ = rand.Read(s[:])
	c := &Checker{book: book, th: DefaultThresholds(), rate: DefaultRate, interval: DefaultInterval,
		fanout: DefaultFanout, minVoters: DefaultMinVoters, maxTokens: DefaultMaxTokens, timeout: DefaultTimeout,
		wake: make(chan struct{}, 1), last: time.Now(), // no round in a node's first interval
		rng: mrand.New(mrand.NewPCG(binary.LittleEndian.Uint64(s[:8]), binary.LittleEndian.Uint64(s[8:])))}
	for _, o := range opts {
		o(c)
	}
	return c
}

// Book is where the checker records its verdicts.
func (c *Checker) Book() *Book { return c.book }

// Stats is what the checker has done so far.
func (c *Checker) Stats() Counters {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

func checkable(t pb.QueryType) bool {
	return t == pb.QueryType_QUERY_TYPE_CHAT || t == pb.QueryType_QUERY_TYPE_EMBED || t == pb.QueryType_QUERY_TYPE_IMAGINE
}

// Observe counts one routed query towards the canary share and, when the
// share allows a round and the interval has passed, schedules one for the
// query's model. It never blocks (router.WithQueryObserver).
func (c *Checker) Observe(req *pb.QueryRequest) {
	if c.rate == 0 || !checkable(req.GetType()) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// A burst after a quiet spell buys at most a few rounds at once.
	c.budget = min(c.budget+c.rate, float64(4*c.fanout))
	if c.pending != nil || c.running || c.budget < float64(c.minVoters) || time.Since(c.last) < c.interval {
		return
	}
	c.pending = &target{model: req.GetModel(), t: req.GetType()}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Run schedules rounds until ctx ends.
func (c *Checker) Run(ctx context.Context, p Prober) {
	var tick <-chan time.Time
	if c.verify {
		t := time.NewTicker(c.interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		var tg *target
		paid := false
		select {
		case <-ctx.Done():
			return
		case <-c.wake:
			c.mu.Lock()
			tg, c.pending = c.pending, nil
			c.running, paid = tg != nil, true
			c.mu.Unlock()
		case <-tick:
			tg = c.pick(p.Models())
		}
		if tg == nil {
			continue
		}
		res, err := c.Round(ctx, p, tg.model, tg.t)
		if err != nil && !errors.Is(err, ErrTooFew) {
			log.Debugw("canary round", "model", tg.model, "err", err)
		}
		if paid {
			// The traffic pays for what was sent; a round larger than
			// the budget leaves a debt that later traffic repays.
			c.mu.Lock()
			c.budget -= float64(len(res.Peers) + res.Failed)
			c.running = false
			c.mu.Unlock()
		}
	}
}

// pick chooses a model and type to check at random.
func (c *Checker) pick(models []router.ModelView) *target {
	var all []target
	for _, m := range models {
		if m.Peers < 2 {
			continue
		}
		for _, tn := range m.Types {
			if t := pb.QueryType(pb.QueryType_value["QUERY_TYPE_"+upper(tn)]); checkable(t) {
				all = append(all, target{m.Name, t})
			}
		}
	}
	if len(all) == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	tg := all[c.rng.IntN(len(all))]
	return &tg
}

func upper(s string) string {
	b := []byte(s)
	for i, x := range b {
		if x >= 'a' && x <= 'z' {
			b[i] = x - 'a' + 'A'
		}
	}
	return string(b)
}

// Result is the outcome of one round.
type Result struct {
	Model      string
	Type       pb.QueryType
	Peers      []peer.ID // the workers that answered
	Agreed     []bool    // by Peers, when Conclusive
	Conclusive bool
	Failed     int // workers asked that gave no answer
}

// Round sends one canary of type t to the workers announcing model,
// judges their answers and records the verdicts. It returns ErrTooFew
// when fewer than two workers (one of them this node's) or three
// workers serve the model.
func (c *Checker) Round(ctx context.Context, p Prober, model string, t pb.QueryType) (Result, error) {
	res := Result{Model: model, Type: t}
	if !checkable(t) {
		return res, fmt.Errorf("%w: %s", ErrUncheckable, t)
	}
	peers := p.CanaryPeers(model, t)
	base := c.request(model, t)
	self := p.Self()
	c.mu.Lock()
	c.last = time.Now()
	// This node's own worker, listed first, stays in; the others are a
	// random sample.
	first := 0
	if len(peers) > 0 && peers[0] == self {
		first = 1
	}
	rest := peers[first:]
	c.rng.Shuffle(len(rest), func(i, j int) { rest[i], rest[j] = rest[j], rest[i] })
	if len(peers) > c.fanout {
		peers = peers[:c.fanout]
	}
	c.mu.Unlock()
	if len(peers) < 2 {
		return res, ErrTooFew
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	answers := make([]*Answer, len(peers))
	errs := make([]error, len(peers))
	var wg sync.WaitGroup
	for i, pid := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i], errs[i] = c.ask(ctx, p, pid, base)
		}()
	}
	wg.Wait()
	var got []*Answer
	for i, a := range answers {
		if errs[i] != nil {
			res.Failed++
			log.Debugw("canary unanswered", "peer", peers[i], "model", model, "err", errs[i])
			continue
		}
		res.Peers = append(res.Peers, peers[i])
		got = append(got, a)
	}
	c.mu.Lock()
	c.stats.Rounds++
	c.stats.Queries += len(peers)
	c.mu.Unlock()
	agreed, ok := c.th.Judge(t, got, c.minVoters)
	if !ok {
		if len(got) < c.minVoters {
			return res, ErrTooFew
		}
		log.Infow("canary inconclusive: no majority", "model", model, "answers", len(got))
		return res, nil
	}
	res.Agreed, res.Conclusive = agreed, true
	disagreed := 0
	for i, a := range got {
		if a.Trusted {
			continue
		}
		c.book.Record(res.Peers[i], agreed[i])
		if !agreed[i] {
			disagreed++
			log.Warnw("worker's answer disagrees with its model", "peer", res.Peers[i], "model", model,
				"type", t, "reputation", c.book.Score(res.Peers[i]))
		}
	}
	c.mu.Lock()
	c.stats.Conclusive++
	c.stats.Disagreed += disagreed
	c.mu.Unlock()
	return res, nil
}

// ask sends one copy of base, with its own random id, to p.
func (c *Checker) ask(ctx context.Context, p Prober, pid peer.ID, base *pb.QueryRequest) (*Answer, error) {
	req := proto.CloneOf(base)
	req.Id = router.NewID()
	if dl, ok := ctx.Deadline(); ok {
		req.DeadlineUnixMs = dl.UnixMilli()
	}
	a := &Answer{}
	var text []byte
	h := func(ev *pb.Event) error {
		switch k := ev.GetKind().(type) {
		case *pb.Event_Chunk:
			if len(text)+len(k.Chunk.GetText()) <= maxAnswerText {
				text = append(text, k.Chunk.GetText()...)
			}
		case *pb.Event_Embedding:
			i := int(k.Embedding.GetIndex())
			if i < 0 || i >= len(base.GetInputs()) {
				return fmt.Errorf("canary: embedding index %d out of range", i)
			}
			for len(a.Vectors) <= i {
				a.Vectors = append(a.Vectors, nil)
			}
			a.Vectors[i] = k.Embedding.GetVector()
		case *pb.Event_Media:
			if a.Media == nil && len(k.Media.GetData()) <= maxAnswerMedia {
				a.Media = k.Media.GetData()
			}
		}
		return nil
	}
	res, err := p.QueryPeer(ctx, pid, req, h)
	if err != nil {
		return nil, err
	}
	a.Text, a.Trusted = string(text), res.Local
	return a, nil
}

// request builds a round's query: a built-in prompt, a fresh seed, and
// temperature 0 where the type samples.
func (c *Checker) request(model string, t pb.QueryType) *pb.QueryRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	seed := c.rng.Int64N(1<<31) + 1
	req := &pb.QueryRequest{Type: t, Model: model}
	switch t {
	case pb.QueryType_QUERY_TYPE_EMBED:
		i := c.rng.IntN(len(embedInputs))
		req.Inputs = []string{embedInputs[i], embedInputs[(i+1)%len(embedInputs)]}
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		req.Prompt = imagePrompts[c.rng.IntN(len(imagePrompts))]
		req.Params = &pb.Params{Seed: &seed, Size: "256x256"}
	default:
		zero := float32(0)
		req.Messages = []*pb.Message{{Role: "user", Content: chatPrompts[c.rng.IntN(len(chatPrompts))]}}
		req.Params = &pb.Params{MaxTokens: c.maxTokens, Temperature: &zero, Seed: &seed}
	}
	return req
}
