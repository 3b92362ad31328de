//go:build cgo

package gpu

import (
	"fmt"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// nvmlLib is the part of nvml.Interface the monitor uses.
type nvmlLib interface {
	Init() nvml.Return
	Shutdown() nvml.Return
	DeviceGetCount() (int, nvml.Return)
	DeviceGetHandleByIndex(int) (nvml.Device, nvml.Return)
}

type device struct {
	h    nvml.Device
	info Info // static fields: Index, Name, UUID
}

// Monitor reads the GPUs of this machine. It is safe for concurrent use.
type Monitor struct {
	cfg    config
	reason string // why there is no GPU, for people; "" when there are some

	mu      sync.Mutex
	lib     nvmlLib // nil when no GPU or closed
	devices []device
	cached  []Info
	readAt  int64 // cfg.now().UnixNano() of cached; 0 = never
	// lastEnergy is each device's counter at the last EnergyMJ.
	lastEnergy []uint64
}

// Open initialises NVML and lists the GPUs. No NVML library or no NVIDIA
// driver means no GPU: a Monitor that reports none. So does any other
// NVML failure (logged, and in the Monitor's String): GPU figures are
// never a reason for a node not to run.
func Open(opts ...Option) *Monitor {
	return open(nvml.New(), newConfig(opts))
}

func open(lib nvmlLib, cfg config) *Monitor {
	m := &Monitor{cfg: cfg}
	switch ret := lib.Init(); ret {
	case nvml.SUCCESS:
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		m.reason = "NVML library not found"
		return m
	case nvml.ERROR_DRIVER_NOT_LOADED:
		// The library is installed (a package dependency) but no driver
		// runs: the same situation for a volunteer as no GPU at all.
		m.reason = "NVIDIA driver not loaded"
		return m
	default:
		// A driver and library of different versions (after an update,
		// before a reboot), no permission in a container: the node runs
		// without GPU figures, and says why.
		m.reason = "NVML unusable: " + ret.Error()
		log.Warnw("GPU telemetry off", "err", ret.Error())
		return m
	}
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		lib.Shutdown()
		m.reason = "NVML unusable: " + ret.Error()
		log.Warnw("GPU telemetry off", "err", ret.Error())
		return m
	}
	for i := 0; i < n; i++ {
		h, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			// A GPU we may not read (permissions, fallen off the bus) is
			// left out rather than failing the node.
			log.Warnw("skipping GPU", "index", i, "err", ret.Error())
			continue
		}
		d := device{h: h, info: Info{Index: i}}
		if name, ret := h.GetName(); ret == nvml.SUCCESS {
			d.info.Name = name
		}
		if uuid, ret := h.GetUUID(); ret == nvml.SUCCESS {
			d.info.UUID = uuid
		}
		m.devices = append(m.devices, d)
	}
	if len(m.devices) == 0 {
		lib.Shutdown()
		m.reason = "no NVIDIA GPU found"
		return m
	}
	m.lib = lib
	m.lastEnergy = make([]uint64, len(m.devices))
	return m
}

// Available reports whether any GPU can be read.
func (m *Monitor) Available() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lib != nil
}

// String says what was found, for the node's start-up line.
func (m *Monitor) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lib == nil {
		if m.reason == "" {
			return "no GPU (monitor closed)"
		}
		return "no GPU (" + m.reason + ")"
	}
	names := make([]string, len(m.devices))
	for i, d := range m.devices {
		names[i] = d.info.Name
	}
	return fmt.Sprintf("%d GPU(s): %s", len(m.devices), strings.Join(names, ", "))
}

// Snapshot returns every GPU's current figures, reading NVML at most once
// per refresh interval. Figures a GPU does not support stay 0. The slice is
// the caller's.
func (m *Monitor) Snapshot() []Info {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lib == nil {
		return nil
	}
	now := m.cfg.now().UnixNano()
	if m.readAt == 0 || now-m.readAt >= int64(m.cfg.refresh) || now < m.readAt {
		m.cached = m.cached[:0]
		for _, d := range m.devices {
			m.cached = append(m.cached, read(d))
		}
		m.readAt = now
	}
	return append([]Info(nil), m.cached...)
}

func read(d device) Info {
	info := d.info
	if mem, ret := d.h.GetMemoryInfo(); ret == nvml.SUCCESS {
		info.VRAMTotal, info.VRAMFree = mem.Total, mem.Free
	}
	if u, ret := d.h.GetUtilizationRates(); ret == nvml.SUCCESS {
		info.UtilPercent = min(u.Gpu, 100)
	}
	if p, ret := d.h.GetPowerUsage(); ret == nvml.SUCCESS {
		info.PowerMW = p
	}
	return info
}

// EnergyMJ is the sum of the GPUs' total-energy counters (millijoules since
// the driver loaded). It is read fresh on every call, and reports false when
// there is no GPU or any GPU lacks the counter (pre-Volta), since a partial
// sum would jump when that GPU came and went, and when any GPU's counter
// went back since the last call (a reset): the others' rise could hide it
// in the sum, which would then pass for a true reading. The next reading
// is good again.
func (m *Monitor) EnergyMJ() (uint64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lib == nil {
		return 0, false
	}
	var sum uint64
	back := false
	for i, d := range m.devices {
		e, ret := d.h.GetTotalEnergyConsumption()
		if ret != nvml.SUCCESS {
			return 0, false
		}
		back = back || e < m.lastEnergy[i]
		m.lastEnergy[i] = e
		sum += e
	}
	return sum, !back
}

// Close releases NVML. The monitor then reports no GPU.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.lib == nil {
		return nil
	}
	lib := m.lib
	m.lib, m.devices, m.cached = nil, nil, nil
	if ret := lib.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: nvml shutdown: %w", ret)
	}
	return nil
}
