package node_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"image"
	"image/color"
	"image/png"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/node/canary"
	"github.com/mtor-swarm/mtor/node/enginetest"
	"github.com/mtor-swarm/mtor/node/enginetest/gguf"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// liarBackend is a hostile test backend: it announces a model it does not
// run and answers every query at once with random text, random vectors
// or a noise image, as a worker faking a big model would to earn traffic.
type liarBackend struct{ model string }

func (l liarBackend) Kind() string { return "liar" }
func (l liarBackend) Name() string { return "hostile test backend (liar)" }
func (l liarBackend) Models(context.Context) ([]backend.Model, error) {
	return []backend.Model{{Name: l.model, ContextLength: 4096, Types: []pb.QueryType{
		pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_EMBED, pb.QueryType_QUERY_TYPE_IMAGINE}}}, nil
}
func (l liarBackend) Probe(context.Context) error { return nil }
func (l liarBackend) Run(_ context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	noise := make([]byte, 64)
	_, _ = rand.Read(noise)
	switch req.GetType() {
	case pb.QueryType_QUERY_TYPE_EMBED:
		for i := range req.GetInputs() {
			v := make([]float32, 16)
			for j := range v {
				v[j] = float32(noise[j]) - 128
			}
			if err := out.Embedding(i, v); err != nil {
				return backend.Usage{}, err
			}
		}
		return backend.Usage{}, nil
	case pb.QueryType_QUERY_TYPE_IMAGINE:
		img := image.NewGray(image.Rect(0, 0, 64, 64))
		for i := range img.Pix {
			img.Pix[i] = noise[i%len(noise)] ^ uint8(i*7)
		}
		img.Set(0, 0, color.Gray{noise[0]})
		var buf bytes.Buffer
		_ = png.Encode(&buf, img)
		return backend.Usage{}, out.Media("image/png", buf.Bytes())
	}
	words := strings.Fields("sure here is a great answer " + hex.EncodeToString(noise[:12]))
	for _, w := range words {
		if err := out.Chunk(w + " "); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{CompletionTokens: uint32(len(words))}, nil
}

func chatQuery(ctx context.Context, n *node.Node, model, prompt string) (peer.ID, string, error) {
	var text strings.Builder
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: model, Prompt: prompt, Params: &pb.Params{MaxTokens: 20}}
	res, err := n.Router().Query(ctx, req, func(ev *pb.Event) error {
		text.WriteString(ev.GetChunk().GetText())
		return nil
	})
	if err != nil {
		return "", "", err
	}
	return res.Peer, text.String(), nil
}

// TestCanaryLiarLosesTraffic: three honest demo workers and one liar
// announcing the same model. A client routing user traffic, with every
// routed query paying for a canary, runs spot checks on its own; the
// liar is distrusted after exactly 3 canaries (N = 3 with the default
// steps: 100 → 75 → 50 → 25 < 40), no honest worker loses any
// reputation, and afterwards no user query reaches the liar.
func TestCanaryLiarLosesTraffic(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(4), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, label string) []backend.Backend {
			if i == 3 {
				return []backend.Backend{liarBackend{model: demo.DefaultModel}}
			}
			return []backend.Backend{demo.New(label, demo.WithDelay(0))}
		}),
		swarmtest.NodeOptions(node.WithCanary(canary.WithRate(1), canary.WithInterval(10*time.Millisecond))))
	client := s.Clients[0]
	liar := s.Workers[3].ID()
	book := client.Canary().Book()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	toLiar := 0
	for i := 0; !book.Distrusted(liar); i++ {
		if ctx.Err() != nil {
			t.Fatalf("liar not distrusted after %d user queries: %+v, checker %+v", i, book.Stats(liar), client.Canary().Stats())
		}
		p, _, err := chatQuery(ctx, client, demo.DefaultModel, "what is the weather like")
		if err != nil {
			t.Fatalf("user query %d: %v", i, err)
		}
		if p == liar {
			toLiar++
		}
	}
	st := client.Canary().Stats()
	if ls := book.Stats(liar); ls.Disagreed != 3 || ls.Agreed != 0 {
		t.Fatalf("liar distrusted after %+v, want 3 disagreements and no agreement", ls)
	}
	for _, w := range s.Workers[:3] {
		if ws := book.Stats(w.ID()); ws.Disagreed != 0 || ws.Score != 100 {
			t.Fatalf("honest worker %s flagged: %+v", w.ID(), ws)
		}
	}
	t.Logf("liar distrusted after %d canary rounds (%d canary queries); it had taken %d user queries", st.Conclusive, st.Queries, toLiar)

	for i := 0; i < 40; i++ {
		p, text, err := chatQuery(ctx, client, demo.DefaultModel, "tell me a story")
		if err != nil {
			t.Fatalf("user query after detection %d: %v", i, err)
		}
		if p == liar || !strings.HasSuffix(text, "You said: tell me a story") {
			t.Fatalf("user query %d answered by %s with %q after the liar was distrusted", i, p, text)
		}
	}
	for _, v := range client.Router().Peers() {
		switch {
		case v.Peer == liar.String() && (!v.Distrusted || v.Reputation >= canary.DefaultThreshold):
			t.Fatalf("peer view of the liar: reputation %v distrusted %v", v.Reputation, v.Distrusted)
		case v.Peer != liar.String() && (v.Distrusted || v.Reputation != 100):
			t.Fatalf("peer view of honest %s: reputation %v distrusted %v", v.Peer, v.Reputation, v.Distrusted)
		}
	}
}

// TestCanaryEveryTypeCatchesTheLiar: embeddings (cosine) and images
// (perceptual hash) catch the liar too, and a node with its own worker
// judges against it as a trusted reference.
func TestCanaryEveryTypeCatchesTheLiar(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(4), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, label string) []backend.Backend {
			if i == 3 {
				return []backend.Backend{liarBackend{model: demo.DefaultModel}}
			}
			return []backend.Backend{demo.New(label, demo.WithDelay(0))}
		}),
		swarmtest.NodeOptions(node.WithCanary(canary.WithRate(0))))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	liar := s.Workers[3].ID()
	tests := []struct {
		name string
		from *node.Node
		typ  pb.QueryType
	}{
		{"embeddings by majority", s.Clients[0], pb.QueryType_QUERY_TYPE_EMBED},
		{"images by majority", s.Clients[0], pb.QueryType_QUERY_TYPE_IMAGINE},
		{"chat against this node's worker", s.Workers[0], pb.QueryType_QUERY_TYPE_CHAT},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chk := tc.from.Canary()
			for i := 0; i < 3; i++ {
				res, err := chk.Round(ctx, tc.from.Router(), demo.DefaultModel, tc.typ)
				if err != nil || !res.Conclusive {
					t.Fatalf("round %d: %+v, %v", i, res, err)
				}
			}
			if !chk.Book().Distrusted(liar) {
				t.Fatalf("liar not distrusted after 3 %s canaries: %+v", protocol.TypeName(tc.typ), chk.Book().Stats(liar))
			}
			for _, w := range s.Workers[:3] {
				if ws := chk.Book().Stats(w.ID()); ws.Disagreed != 0 {
					t.Fatalf("honest %s flagged: %+v", w.ID(), ws)
				}
			}
		})
	}
}

// TestCanaryFalsePositivesWithEngines runs many chat canaries against
// three workers in front of real llama.cpp engines serving the same
// model, and one in front of an engine serving another model (other
// weights) under the same name. With a fixed seed and temperature 0 the
// honest workers must never be flagged; the impostor must be. The figure
// in docs/benchmarks.md comes from this test:
//
//	go test ./node -run TestCanaryFalsePositivesWithEngines -count=1 -v
func TestCanaryFalsePositivesWithEngines(t *testing.T) {
	rounds := 200
	if testing.Short() {
		rounds = 20
	}
	engines := make([]*enginetest.Engine, 4)
	for i := range engines {
		g := gguf.Config{}
		if i == 3 {
			g.Seed = 2 // another model under the same name
		}
		engines[i] = enginetest.Start(t, enginetest.WithGGUF(g), enginetest.WithSequences(2))
	}
	s := swarmtest.New(t, swarmtest.Workers(4), swarmtest.Clients(1),
		swarmtest.Backends(func(i int, label string) []backend.Backend {
			b, err := openai.New(engines[i].URL())
			if err != nil {
				t.Fatal(err)
			}
			return []backend.Backend{b}
		}),
		swarmtest.NodeOptions(node.WithCanary(canary.WithRate(0))))
	client, impostor := s.Clients[0], s.Workers[3].ID()
	chk := client.Canary()
	model := engines[0].Model()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	detectedAt := 0
	for i := 1; i <= rounds; i++ {
		res, err := chk.Round(ctx, client.Router(), model, pb.QueryType_QUERY_TYPE_CHAT)
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		if !res.Conclusive || len(res.Peers) != 4 {
			t.Fatalf("round %d inconclusive or short: %+v", i, res)
		}
		if detectedAt == 0 && chk.Book().Distrusted(impostor) {
			detectedAt = i
		}
	}
	falsePos, verdicts := 0, 0
	for _, w := range s.Workers[:3] {
		ws := chk.Book().Stats(w.ID())
		falsePos += ws.Disagreed
		verdicts += ws.Agreed + ws.Disagreed
	}
	t.Logf("%d chat canaries, %d verdicts on honest engine workers, %d false positives; impostor distrusted after %d canaries (%+v)",
		rounds, verdicts, falsePos, detectedAt, chk.Book().Stats(impostor))
	if falsePos != 0 {
		t.Fatalf("%d false positives on honest workers", falsePos)
	}
	if detectedAt != 3 {
		t.Fatalf("impostor distrusted after %d canaries, want 3", detectedAt)
	}
}

// TestCanaryShareOfTraffic: canaries cost the configured share of the
// routed queries, and no round runs before the interval has passed.
func TestCanaryShareOfTraffic(t *testing.T) {
	tests := []struct {
		name      string
		rate      float64
		interval  time.Duration
		minRounds int
	}{
		{"a tenth", 0.1, time.Millisecond, 1},
		{"interval not over", 1, time.Hour, 0},
		{"off", 0, time.Millisecond, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := swarmtest.New(t, swarmtest.Workers(3), swarmtest.Clients(1), swarmtest.DemoDelay(0),
				swarmtest.NodeOptions(node.WithCanary(canary.WithRate(tc.rate), canary.WithInterval(tc.interval))))
			client := s.Clients[0]
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			const users = 300
			for i := 0; i < users; i++ {
				if _, _, err := chatQuery(ctx, client, demo.DefaultModel, "hello"); err != nil {
					t.Fatal(err)
				}
			}
			st := client.Canary().Stats()
			if limit := tc.rate * users; float64(st.Queries) > limit || st.Rounds < tc.minRounds {
				t.Fatalf("%d canary queries in %d rounds for %d routed queries, want at most %.0f and at least %d rounds",
					st.Queries, st.Rounds, users, limit, tc.minRounds)
			}
			if tc.minRounds == 0 && st.Queries != 0 {
				t.Fatalf("%d canary queries, want none", st.Queries)
			}
			t.Logf("%d canary queries in %d rounds for %d routed queries", st.Queries, st.Rounds, users)
		})
	}
}
