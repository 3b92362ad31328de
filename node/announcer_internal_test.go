package node

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestSignificantChanges(t *testing.T) {
	base := func() *pb.Announce {
		return &pb.Announce{
			Health: 100,
			Load:   &pb.Load{InFlight: 1, MaxConcurrency: 4, MaxQueue: 8},
			Models: []*pb.ModelInfo{{Name: "m", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT}, TokensPerSec: 10}},
			Gpus:   []*pb.GPU{{Name: "g", PowerMw: 100000}},
		}
	}
	tests := []struct {
		name   string
		change func(*pb.Announce)
		want   bool // publish before the heartbeat
	}{
		{"load within free slots", func(a *pb.Announce) { a.Load.InFlight = 3 }, false},
		{"slots full", func(a *pb.Announce) { a.Load.InFlight = 4 }, true},
		{"measured speed", func(a *pb.Announce) { a.Models[0].TokensPerSec = 55 }, false},
		{"gpu power reading", func(a *pb.Announce) { a.Gpus[0].PowerMw = 250000 }, false},
		{"health wobble", func(a *pb.Announce) { a.Health = 95 }, false},
		{"health drop", func(a *pb.Announce) { a.Health = 60 }, true},
		{"new model", func(a *pb.Announce) { a.Models = append(a.Models, &pb.ModelInfo{Name: "n", Types: a.Models[0].Types}) }, true},
		{"draining", func(a *pb.Announce) { a.Draining = true }, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, b := base(), base()
			tc.change(b)
			if got := !proto.Equal(significant(a), significant(b)); got != tc.want {
				t.Fatalf("significant change = %v, want %v", got, tc.want)
			}
		})
	}
}

// countingPublisher records publishes instead of gossiping them.
type countingPublisher struct{ n atomic.Int64 }

func (c *countingPublisher) Publish(context.Context, *pb.Announce) error { c.n.Add(1); return nil }
func (c *countingPublisher) Provide(context.Context, string) error       { return nil }
func (c *countingPublisher) ProvideRelay(context.Context) error          { return nil }

// A stream of kicks (every query changes the load) must not starve the
// heartbeat: with no significant change, heartbeats still go out on time.
func TestKicksDoNotStarveTheHeartbeat(t *testing.T) {
	pub := &countingPublisher{}
	w := worker.New(nil)
	a := newAnnouncer(pub, w, nil, nil, "test", 50*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.run(ctx); close(done) }()
	// The baseline: a 50 ms ticker's ticks the same second, read by a
	// goroutine of its own, which a loaded machine delays as it does
	// the announcer.
	var ticks atomic.Int64
	go func() {
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tk.C:
				ticks.Add(1)
			}
		}
	}()
	stop := time.After(time.Second)
kicking:
	for {
		select {
		case <-stop:
			break kicking
		default:
			a.changed()
			time.Sleep(time.Millisecond)
		}
	}
	cancel()
	<-done
	// One second of 50 ms heartbeats (±20 %) is about 20, as many as the
	// ticker's ticks; a starved loop managed 2. At least a third of the
	// ticks.
	if n, want := pub.n.Load(), ticks.Load()/3; n < max(want, 3) {
		t.Fatalf("%d publishes in 1 s with a 50 ms heartbeat under constant kicks, want %d (a third of a 50 ms ticker's %d ticks)", n, max(want, 3), ticks.Load())
	}
}

// A provider record that cannot be put yet (the DHT routing table of a
// node just started is empty) is tried again, spaced by provideRetry,
// until it is put or the node stops.
func TestProvideTriesAgain(t *testing.T) {
	a := newAnnouncer(&countingPublisher{}, worker.New(nil), nil, nil, "test", time.Second)
	a.provideRetry = backoff{floor: 10 * time.Millisecond, ceil: 20 * time.Millisecond}
	errEmpty := errors.New("failed to find any peer in table")
	for _, tc := range []struct {
		name     string
		failures int  // tries that fail before one succeeds (-1: all)
		stop     bool // the node stops while it tries
		want     bool
	}{
		{"at once", 0, false, true},
		{"after three failures", 3, false, true},
		{"node stopping", -1, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var tries int
			got := a.provide(ctx, func(context.Context) error {
				tries++
				if tc.stop && tries == 5 {
					cancel()
				}
				if tc.failures < 0 || tries <= tc.failures {
					return errEmpty
				}
				return nil
			})
			if got != tc.want {
				t.Fatalf("provide = %v after %d tries, want %v", got, tries, tc.want)
			}
			if tc.failures >= 0 && tries != tc.failures+1 {
				t.Fatalf("%d tries, want %d", tries, tc.failures+1)
			}
		})
	}
}
