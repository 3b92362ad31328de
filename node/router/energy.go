package router

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// DefaultEnergySlack is how much slower than the best expected latency a
// worker may be and still win a query that prefers energy: within 1.5× of
// the fastest, the lowest measured joules per token goes first.
const DefaultEnergySlack = 1.5

// energySlackMs widens the slack by a few milliseconds: on one LAN every
// worker answers within one or two, and the ratio of two such figures is
// noise (a worker measured at 1.2 ms is not 4× slower than one at 0.3).
const energySlackMs = 10

// EnergyPreference is whether a query prefers the lowest measured joules
// per token over the lowest expected latency.
type EnergyPreference int

const (
	// EnergyDefault follows the router's own setting (WithPreferEnergy).
	EnergyDefault EnergyPreference = iota
	// EnergyPrefer prefers the lowest joules per token within the slack.
	EnergyPrefer
	// EnergyIgnore ranks by expected latency alone.
	EnergyIgnore
)

type energyKey struct{}

// WithEnergyPreference sets a query's energy preference in its context,
// overriding the router's default for this query alone. The preference
// chooses among workers; it does not travel to them.
func WithEnergyPreference(ctx context.Context, p EnergyPreference) context.Context {
	return context.WithValue(ctx, energyKey{}, p)
}

// ErrBadPreference is a preference that is neither "energy" nor "latency".
var ErrBadPreference = errors.New(`the preference must be "energy" or "latency"`)

// ParseEnergyPreference reads a client's preference, as every API spells
// it: "energy" (EnergyPrefer), "latency" (EnergyIgnore), "" (EnergyDefault,
// the router's own). Case and surrounding space do not matter; anything
// else is ErrBadPreference, never silently the default.
func ParseEnergyPreference(s string) (EnergyPreference, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "":
		return EnergyDefault, nil
	case "energy":
		return EnergyPrefer, nil
	case "latency":
		return EnergyIgnore, nil
	}
	return EnergyDefault, fmt.Errorf("%w, not %q", ErrBadPreference, s)
}

// EnergyPreferenceOf is the preference WithEnergyPreference put in ctx.
func EnergyPreferenceOf(ctx context.Context) EnergyPreference {
	p, _ := ctx.Value(energyKey{}).(EnergyPreference)
	return p
}

// WithPreferEnergy makes energy the router's default preference when on;
// slack (≤ 1: DefaultEnergySlack) is the latency slack of every query that
// prefers energy, by that default or by its own (WithEnergyPreference).
func WithPreferEnergy(on bool, slack float64) Option {
	return func(r *Router) {
		r.preferEnergy = on
		r.energySlack = slack
	}
}

// energySlackFor is the slack that applies to the query with ctx, 0 when
// it ranks by latency alone.
func (r *Router) energySlackFor(ctx context.Context) float64 {
	p := EnergyPreferenceOf(ctx)
	on := p == EnergyPrefer || (p == EnergyDefault && r.preferEnergy)
	if !on {
		return 0
	}
	if r.energySlack > 1 {
		return r.energySlack
	}
	return DefaultEnergySlack
}

// EnergyProbeEvery is how often a router preferring energy sends a query
// to a worker with a GPU that announces no joules per token for the model
// yet, so that it gets measured; without it the first worker measured
// would take every such query and a frugal newcomer would never be.
const EnergyProbeEvery = 10 * time.Minute

// byEnergy reorders ranked (best expected latency first) so that the free
// workers whose score is within slack × the best free score (plus
// energySlackMs) come first, lowest announced joules per token first;
// workers that have measured no energy (0: unknown) follow those that
// have, in latency order. Full
// workers and those outside the slack keep their places behind. It
// reports whether energy decided the order, when the caller takes the
// first rather than draw between the two best: a burst then goes to the
// frugal worker until its announced load makes it full.
//
// One exception, the probe: a worker within the slack that announces a
// GPU but no joules per token for the model goes first, once per
// EnergyProbeEvery, so that its answer measures it. A worker without a
// GPU measures nothing and is never probed; one whose GPU has no energy
// counter costs one query per period.
func (r *Router) byEnergy(ranked []scored, model string, t pb.QueryType, slack float64) bool {
	if slack <= 0 || len(ranked) < 2 || ranked[0].last() {
		return false
	}
	limit := ranked[0].score*slack + energySlackMs
	n := 0
	for n < len(ranked) && !ranked[n].last() && ranked[n].score <= limit {
		n++
	}
	measured := r.measuredJPT(ranked[:n], model)
	jpt := func(s scored) float32 {
		// The more of what the worker announces and what its answers
		// here reported: announcing less than it reports gains nothing.
		return max(modelInfo(s.Announce, model, t).GetJoulesPerToken(), measured[s.Peer])
	}
	if i := r.energyProbe(ranked[:n], model, jpt); i >= 0 {
		c := ranked[i]
		copy(ranked[1:i+1], ranked[:i])
		ranked[0] = c
		return true
	}
	known := false
	for _, s := range ranked[:n] {
		if jpt(s) > 0 {
			known = true
			break
		}
	}
	if !known {
		return false
	}
	slices.SortStableFunc(ranked[:n], func(a, b scored) int {
		ja, jb := jpt(a), jpt(b)
		switch {
		case ja > 0 && jb > 0 && ja != jb:
			if ja < jb {
				return -1
			}
			return 1
		case ja > 0 && jb <= 0:
			return -1
		case ja <= 0 && jb > 0:
			return 1
		}
		return 0
	})
	return true
}

// energyProbe is the index in within of the first worker due a probe for
// model (byEnergy), now marked as probed; -1 when none is.
func (r *Router) energyProbe(within []scored, model string, jpt func(scored) float32) int {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, s := range within {
		if jpt(s) > 0 || len(s.Announce.GetGpus()) == 0 {
			continue
		}
		st := r.state(s.Peer)
		if last, ok := st.energyProbed[model]; ok && now.Sub(last) < EnergyProbeEvery {
			continue
		}
		if st.energyProbed == nil {
			st.energyProbed = make(map[string]time.Time)
		}
		st.energyProbed[model] = now
		return i
	}
	return -1
}

// noteEnergy folds the joules per token of done, an answer of p for
// model, into what this router has seen of p.
func (r *Router) noteEnergy(p peer.ID, model string, done *pb.Done) {
	tokens := done.GetUsage().GetCompletionTokens()
	if done.GetEnergyMj() == 0 || tokens == 0 {
		return
	}
	j := float32(float64(done.GetEnergyMj()) / 1000 / float64(tokens))
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.state(p)
	if st.jpt == nil {
		st.jpt = map[string]float32{}
	}
	old, ok := st.jpt[model]
	switch {
	case !ok && len(st.jpt) >= maxModelTrackers:
		return
	case !ok:
		st.jpt[model] = j
	default:
		st.jpt[model] = float32(ewma(float64(old), float64(j)))
	}
}

// measuredJPT is the joules per token this router has seen from each of
// cands for model (0: none).
func (r *Router) measuredJPT(cands []scored, model string) map[peer.ID]float32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := make(map[peer.ID]float32, len(cands))
	for _, c := range cands {
		if st := r.peers[c.Peer]; st != nil {
			m[c.Peer] = st.jpt[model]
		}
	}
	return m
}
