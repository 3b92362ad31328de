package protocol

import (
	"math"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Estimate holds the inputs of a worker's score: the expected time to
// first token of a query sent to it now, in ms, divided by its health. The
// router fills it with what it measured of the worker; a peer table that
// keeps a bounded number of workers per model, with what the worker's
// announcement and our pings say. One formula, so that the table keeps the
// workers the router would choose.
type Estimate struct {
	RTTMs     float64 // round trip to the worker
	TTFTMs    float64 // time to first token when the worker has a free slot
	ServiceMs float64 // time one query holds a slot
	Occupied  float64 // queries in flight and queued there
	Slots     float64 // its max concurrency (at least 1 is assumed)
	Health    float64 // 0..1
}

// Figures assumed until a worker has announced or been measured.
const (
	DefaultTTFTMs    = 100
	DefaultServiceMs = 1000
)

// minHealth floors the health a score is divided by, so that a failing
// worker scores far worse, not infinitely worse, and can recover.
const minHealth = 0.05

// clearSlackMs keeps workers a few milliseconds apart (all fast, on one
// LAN) from being told apart even when one is twice as fast.
const clearSlackMs = 10

// Score is the expected time to first token in ms, divided by health:
// lower is better. A query queues behind the occupied slots, each taking
// the service time, once every slot is taken.
func (e Estimate) Score() float64 {
	slots := math.Max(e.Slots, 1)
	wait := 0.0
	if e.Occupied >= slots {
		wait = (e.Occupied - slots + 1) / slots * e.ServiceMs
	}
	est := e.RTTMs + e.TTFTMs*(1+e.Occupied/slots) + wait
	return est / math.Max(e.Health, minHealth)
}

// AnnouncedEstimate is the estimate of a worker from its announcement and
// the RTT of our pings (0: unknown, left out) for model entry mi: its
// announced TTFT, load and health, and the default service time.
func AnnouncedEstimate(a *pb.Announce, mi *pb.ModelInfo, rtt time.Duration) Estimate {
	l := a.GetLoad()
	ttft := float64(mi.GetP50TtftMs())
	if ttft == 0 {
		ttft = DefaultTTFTMs
	}
	return Estimate{
		RTTMs:     float64(rtt.Milliseconds()),
		TTFTMs:    ttft,
		ServiceMs: DefaultServiceMs,
		Occupied:  float64(l.GetInFlight() + l.GetQueued()),
		Slots:     float64(l.GetMaxConcurrency()),
		Health:    float64(a.GetHealth()) / 100,
	}
}

// ClearlyBetter reports whether score a is clearly better than score b:
// under half of it, by more than a few milliseconds. Between workers that
// are not clearly apart, the router draws lots and a bounded peer table
// keeps the one it has, so that near-equal workers do not take turns.
func ClearlyBetter(a, b float64) bool {
	return b > 2*a+clearSlackMs
}
