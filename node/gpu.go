package node

import (
	"github.com/mtor-swarm/mtor/node/gpu"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// WithGPUMonitor announces the monitor's GPUs and measures the energy of
// each query from its total-energy counter. A monitor without GPUs (the
// normal case on a machine without NVIDIA's library) changes nothing.
func WithGPUMonitor(m *gpu.Monitor) Option {
	return func(c *config) error {
		if m == nil || !m.Available() {
			return nil
		}
		c.gpus = monitorSource{m}
		if _, ok := m.EnergyMJ(); ok {
			c.meter = meterAdapter{gpu.NewMeter(m.EnergyMJ)}
		}
		return nil
	}
}

type monitorSource struct{ m *gpu.Monitor }

func (s monitorSource) GPUs() []*pb.GPU { return gpu.ToProto(s.m.Snapshot()) }

// meterAdapter shapes gpu.Meter as the worker's EnergyMeter.
type meterAdapter struct{ m *gpu.Meter }

func (a meterAdapter) Begin() func() (uint64, bool) {
	t := a.m.Begin()
	return func() (uint64, bool) { return a.m.End(t) }
}
