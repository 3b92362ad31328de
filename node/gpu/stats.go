package gpu

import "sync"

const (
	// DefaultAlpha is the weight of the newest query in EnergyStats.
	DefaultAlpha = 0.2
	// DefaultMaxModels bounds the models EnergyStats tracks.
	DefaultMaxModels = 1024
)

// EnergyStats keeps a running joules-per-token figure per model for
// announcements.
//
// It is a ratio of exponential moving averages: each query updates
// E ← E + α(mJ − E) and T ← T + α(tokens − T), and the figure is E / T
// (in joules: /1000). Averaging energy and tokens separately weights each
// query by its size, so a burst of tiny queries does not swing the figure
// the way an average of per-query ratios would, while α (DefaultAlpha) lets
// it follow a change of GPU clock, load or quantisation within a few
// queries. The first query sets E and T outright.
//
// Only measured queries belong here: pass energies for which Meter.End
// reported ok, and only queries that produced tokens.
type EnergyStats struct {
	alpha     float64
	maxModels int

	mu     sync.Mutex
	models map[string]*ema
}

type ema struct {
	mJ, tokens float64
}

// StatsOption configures EnergyStats.
type StatsOption func(*EnergyStats)

// WithAlpha sets the weight of the newest query, in (0, 1].
func WithAlpha(a float64) StatsOption {
	return func(s *EnergyStats) {
		if a > 0 && a <= 1 {
			s.alpha = a
		}
	}
}

// WithMaxModels bounds the models tracked; queries of further models are
// ignored until Forget makes room.
func WithMaxModels(n int) StatsOption { return func(s *EnergyStats) { s.maxModels = n } }

// NewEnergyStats builds an empty EnergyStats.
func NewEnergyStats(opts ...StatsOption) *EnergyStats {
	s := &EnergyStats{alpha: DefaultAlpha, maxModels: DefaultMaxModels, models: make(map[string]*ema)}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Record adds one query's measured energy and completion tokens. A query
// without tokens says nothing per token and is ignored.
func (s *EnergyStats) Record(model string, mJ uint64, tokens uint32) {
	if tokens == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.models[model]
	if !ok {
		if len(s.models) >= s.maxModels {
			return
		}
		s.models[model] = &ema{mJ: float64(mJ), tokens: float64(tokens)}
		return
	}
	e.mJ += s.alpha * (float64(mJ) - e.mJ)
	e.tokens += s.alpha * (float64(tokens) - e.tokens)
}

// JoulesPerToken is the model's running figure, 0 when unknown.
func (s *EnergyStats) JoulesPerToken(model string) float32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.models[model]
	if !ok || e.tokens <= 0 {
		return 0
	}
	return float32(e.mJ / e.tokens / 1000)
}

// Forget drops a model, e.g. one the backend no longer serves.
func (s *EnergyStats) Forget(model string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.models, model)
}
