package gpu

import (
	"math"
	"sync"
)

// DefaultMaxActive bounds the queries a Meter tracks at once.
const DefaultMaxActive = 4096

// Meter measures the GPU energy of each query from a cumulative energy
// counter (Monitor.EnergyMJ), apportioning it when queries overlap.
//
// The rule: the counter is read at every query start and every query end.
// The energy consumed between two consecutive readings is split equally
// among the queries in flight during that interval. A query's energy is the
// sum of its shares over the intervals between its own start and end.
// Energy used while no query runs (idle draw) belongs to no query.
//
// So one query alone gets the whole delta of the counter across it; two
// queries running side by side get half each; a query that overlaps another
// for part of its run gets the full energy of the intervals it ran alone
// and half of the shared ones.
//
// A reading that fails, or a counter that goes backwards (driver reload),
// makes the interval that ends there unknown: every query in flight across
// it reports ok=false at its end, and the next good reading is a fresh
// baseline. Queries that start after it are measured normally.
//
// Each Begin and End costs O(1): the meter keeps the running sum S of
// delta/n over all intervals (n = queries in flight), and a query's energy
// is S at its end minus S at its start. S restarts at 0 whenever no query is
// in flight, so it stays small and exact enough (float64 of millijoules).
//
// The source is called with the meter's lock held, which orders readings
// with the start and end of queries; it must be quick (an NVML read is well
// under a millisecond). The NVML counter advances in steps (tens of
// milliseconds), so a very short query may measure 0.
type Meter struct {
	source    func() (uint64, bool)
	maxActive int

	mu     sync.Mutex
	last   uint64  // last reading
	lastOK bool    // whether last is a good baseline
	sum    float64 // S: cumulative energy per query in flight, mJ
	epoch  uint64  // bumped by every unknown interval with queries in flight
	nextID uint64
	active map[uint64]begun
}

type begun struct {
	sum   float64
	epoch uint64
}

// Token identifies a query between Begin and End. The zero Token is not
// tracked: End reports ok=false for it.
type Token struct{ id uint64 }

// MeterOption configures a Meter.
type MeterOption func(*Meter)

// WithMaxActive bounds the queries tracked at once; Begin beyond it returns
// an untracked Token.
func WithMaxActive(n int) MeterOption { return func(m *Meter) { m.maxActive = n } }

// NewMeter builds a meter over source, a cumulative energy counter in mJ
// that returns false when it cannot be read. A nil source measures nothing.
func NewMeter(source func() (uint64, bool), opts ...MeterOption) *Meter {
	m := &Meter{source: source, maxActive: DefaultMaxActive, active: make(map[uint64]begun)}
	for _, o := range opts {
		o(m)
	}
	return m
}

// Begin marks the start of a query.
func (m *Meter) Begin() Token {
	if m == nil || m.source == nil {
		return Token{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.active) >= m.maxActive {
		return Token{}
	}
	m.advance()
	m.nextID++
	m.active[m.nextID] = begun{sum: m.sum, epoch: m.epoch}
	return Token{id: m.nextID}
}

// End marks the end of the query and returns its energy in millijoules;
// ok is false when it could not be measured (no counter, a failed reading
// during the query, an untracked or already ended Token).
func (m *Meter) End(t Token) (mJ uint64, ok bool) {
	if m == nil || m.source == nil || t.id == 0 {
		return 0, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	b, found := m.active[t.id]
	if !found {
		return 0, false
	}
	m.advance()
	delete(m.active, t.id)
	e := m.sum - b.sum
	if len(m.active) == 0 {
		m.sum = 0 // nothing refers to S now: restart it to keep it small
	}
	if b.epoch != m.epoch {
		return 0, false
	}
	return uint64(math.Round(e)), true
}

// Active is the number of queries in flight.
func (m *Meter) Active() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.active)
}

// advance reads the counter and shares the energy since the last reading
// among the queries in flight. Called with mu held, before the set of
// queries in flight changes.
func (m *Meter) advance() {
	e, ok := m.source()
	n := len(m.active)
	if ok && m.lastOK && e >= m.last {
		if n > 0 {
			m.sum += float64(e-m.last) / float64(n)
		}
	} else if n > 0 {
		m.epoch++ // the interval's energy is unknown: taint the queries in it
	}
	m.last, m.lastOK = e, ok
}
