// Package wstest gives the bridge's tests a Swarm without a network: the
// demo backend (node/backend/demo) run in-process behind the Swarm
// interface, as if the node's router had picked a local worker. Multi-node
// tests use node/swarmtest instead.
package wstest

import (
	"context"
	"crypto/rand"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// DemoSwarm is one local worker running demo backends.
type DemoSwarm struct {
	peer       peer.ID
	energyPerT uint64 // fake GPU energy per completion token, mJ; 0 = none

	mu       sync.Mutex
	backends []*demo.Backend

	queries   atomic.Int64
	cancelled atomic.Int64
	inFlight  atomic.Int64
	// prefer is the energy preference of the last query's context.
	prefer atomic.Int64
}

// Option configures a DemoSwarm.
type Option func(*DemoSwarm)

// WithFakeEnergy makes Done report mjPerToken of GPU energy per completion
// token. It is a fake: there is no GPU here to measure.
func WithFakeEnergy(mjPerToken uint64) Option {
	return func(d *DemoSwarm) { d.energyPerT = mjPerToken }
}

// WithBackend adds a demo backend (several serve several models).
func WithBackend(b *demo.Backend) Option {
	return func(d *DemoSwarm) { d.backends = append(d.backends, b) }
}

// New builds a demo swarm with a fresh peer identity. Without WithBackend it
// serves the demo model with the demo's default delay.
func New(opts ...Option) (*DemoSwarm, error) {
	sk, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	id, err := peer.IDFromPrivateKey(sk)
	if err != nil {
		return nil, err
	}
	d := &DemoSwarm{peer: id}
	for _, o := range opts {
		o(d)
	}
	if len(d.backends) == 0 {
		d.backends = []*demo.Backend{demo.New(ShortID(id))}
	}
	return d, nil
}

// Peer is the worker's peer ID.
func (d *DemoSwarm) Peer() peer.ID { return d.peer }

// AddBackend starts serving another backend's models.
func (d *DemoSwarm) AddBackend(b *demo.Backend) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.backends = append(d.backends, b)
}

// Queries, Cancelled and InFlight count what the worker saw: queries run,
// queries whose backend call was stopped by cancellation, and running now.
func (d *DemoSwarm) Queries() int   { return int(d.queries.Load()) }
func (d *DemoSwarm) Cancelled() int { return int(d.cancelled.Load()) }
func (d *DemoSwarm) InFlight() int  { return int(d.inFlight.Load()) }

// LastPreference is the energy preference the last query came with
// (router.WithEnergyPreference): what a router would have ranked by.
func (d *DemoSwarm) LastPreference() router.EnergyPreference {
	return router.EnergyPreference(d.prefer.Load())
}

func (d *DemoSwarm) models() []backend.Model {
	d.mu.Lock()
	bs := append([]*demo.Backend(nil), d.backends...)
	d.mu.Unlock()
	var out []backend.Model
	for _, b := range bs {
		ms, _ := b.Models(context.Background())
		out = append(out, ms...)
	}
	return out
}

func (d *DemoSwarm) backendFor(model string, t pb.QueryType) *demo.Backend {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range d.backends {
		ms, _ := b.Models(context.Background())
		for _, m := range ms {
			if m.Name == model && m.HasType(t) {
				return b
			}
		}
	}
	return nil
}

type sink struct {
	h     router.Handler
	first func()
}

func (s sink) Chunk(text string) error {
	s.first()
	return s.h(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text}}})
}

func (s sink) Media(mime string, data []byte) error {
	s.first()
	return s.h(&pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: mime, Data: data}}})
}

func (s sink) Embedding(i int, v []float32) error {
	s.first()
	return s.h(&pb.Event{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Index: uint32(i), Vector: v}}})
}

// Query runs req on the demo backend serving its model.
func (d *DemoSwarm) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	if err := protocol.ValidateRequest(req); err != nil {
		return nil, err
	}
	b := d.backendFor(req.GetModel(), req.GetType())
	if b == nil {
		return nil, protocol.Errorf(protocol.CodeUnsupported, "no peer serves model %q for %s", req.GetModel(), protocol.TypeName(req.GetType()))
	}
	d.queries.Add(1)
	d.prefer.Store(int64(router.EnergyPreferenceOf(ctx)))
	d.inFlight.Add(1)
	defer d.inFlight.Add(-1)
	start := time.Now()
	if err := h(&pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{}}}); err != nil {
		return nil, protocol.Errorf(protocol.CodeCancelled, "handler: %v", err)
	}
	var ttft time.Duration
	var once sync.Once
	usage, err := b.Run(ctx, req, sink{h: h, first: func() { once.Do(func() { ttft = time.Since(start) }) }})
	if err != nil {
		if ctx.Err() != nil {
			d.cancelled.Add(1)
		}
		return nil, protocol.AsError(err)
	}
	total := time.Since(start)
	return &router.Result{
		Peer:     d.peer,
		Local:    true,
		Attempts: 1,
		Done: &pb.Done{
			Usage:         &pb.Usage{PromptTokens: usage.PromptTokens, CompletionTokens: usage.CompletionTokens},
			Timing:        &pb.Timing{TtftMs: uint32(ttft.Milliseconds()), TotalMs: uint32(total.Milliseconds())},
			EnergyMj:      d.energyPerT * uint64(usage.CompletionTokens),
			WorkerVersion: "demo",
			Model:         req.GetModel(),
		},
		TTFTMs:  uint32(ttft.Milliseconds()),
		TotalMs: uint32(total.Milliseconds()),
	}, nil
}

// Peers is the one local worker.
func (d *DemoSwarm) Peers() []router.PeerView {
	var ms []router.ModelStat
	for _, m := range d.models() {
		ms = append(ms, router.ModelStat{Name: m.Name, Types: typeNames(m.Types), Backend: "demo", ContextLength: m.ContextLength})
	}
	return []router.PeerView{{
		Peer:           d.peer.String(),
		Self:           true,
		Version:        "demo",
		Roles:          []string{"worker", "bridge"},
		Models:         ms,
		InFlight:       uint32(d.InFlight()),
		MaxConcurrency: 4,
		LocalInFlight:  d.InFlight(),
		Health:         100,
		LocalHealth:    100,
		Breaker:        "closed",
	}}
}

// Models lists every model with its types.
func (d *DemoSwarm) Models() []router.ModelView {
	var out []router.ModelView
	for _, m := range d.models() {
		out = append(out, router.ModelView{Name: m.Name, Types: typeNames(m.Types), Peers: 1})
	}
	return out
}

func typeNames(ts []pb.QueryType) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = protocol.TypeName(t)
	}
	return out
}

// ShortID is the last 8 characters of a peer ID, the form people see.
func ShortID(id peer.ID) string {
	s := id.String()
	return s[max(0, len(s)-8):]
}
