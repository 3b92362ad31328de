//go:build !cgo

package gpu

// Monitor, in a build without cgo, cannot load NVML and reports no GPU.
type Monitor struct{}

// Open returns a Monitor with no GPU: NVML needs cgo.
func Open(opts ...Option) *Monitor {
	_ = newConfig(opts)
	return &Monitor{}
}

// Available is false: no GPU can be read without cgo.
func (m *Monitor) Available() bool { return false }

// String says why there is no GPU.
func (m *Monitor) String() string { return "no GPU (built without cgo, NVML unavailable)" }

// Snapshot reports no GPUs.
func (m *Monitor) Snapshot() []Info { return nil }

// EnergyMJ is unknown.
func (m *Monitor) EnergyMJ() (uint64, bool) { return 0, false }

// Close does nothing.
func (m *Monitor) Close() error { return nil }
