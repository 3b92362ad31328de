//go:build cgo

package gpu

import (
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// TestRealNVML runs against whatever this machine has. Without an NVIDIA
// driver (the normal case here) NVML reports ERROR_LIBRARY_NOT_FOUND and Open
// yields a no-GPU monitor; with one, the GPUs are read.
func TestRealNVML(t *testing.T) {
	lib := nvml.New()
	ret := lib.Init()
	if ret == nvml.SUCCESS {
		lib.Shutdown()
	}
	m := Open()
	defer m.Close()
	t.Logf("nvml.Init: %v; monitor: %s", ret, m)
	switch ret {
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		if m.Available() || m.Snapshot() != nil {
			t.Fatalf("no NVML library, yet the monitor reports GPUs: %v", m.Snapshot())
		}
		if e, ok := m.EnergyMJ(); ok || e != 0 {
			t.Fatalf("EnergyMJ = %d, %v without a GPU", e, ok)
		}
		if !strings.Contains(m.String(), "not found") {
			t.Errorf("String %q", m.String())
		}
	case nvml.SUCCESS:
		infos := m.Snapshot()
		t.Logf("%s: %+v", m, infos)
		if !m.Available() || len(infos) == 0 || infos[0].Name == "" || infos[0].VRAMTotal == 0 {
			t.Fatalf("NVML works but the monitor reads %+v", infos)
		}
	default:
		t.Fatalf("nvml.Init returned %v, want SUCCESS or ERROR_LIBRARY_NOT_FOUND", ret)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if m.Available() || m.Snapshot() != nil {
		t.Fatal("closed monitor still reports GPUs")
	}
}

// fakeGPU is what a fakeNVML device reports.
type fakeGPU struct {
	name, uuid  string
	total, free uint64
	util, power uint32
	energy      uint64
	noEnergy    bool // pre-Volta: no energy counter
}

// fakeNVML is a fake NVML (no GPU can run here), built on go-nvml's own moq
// mocks: Init returns initRet, and the devices report gpus.
func fakeNVML(initRet nvml.Return, gpus ...*fakeGPU) (*mock.Interface, []*mock.Device) {
	devs := make([]*mock.Device, len(gpus))
	for i, g := range gpus {
		devs[i] = &mock.Device{
			GetNameFunc:       func() (string, nvml.Return) { return g.name, nvml.SUCCESS },
			GetUUIDFunc:       func() (string, nvml.Return) { return g.uuid, nvml.SUCCESS },
			GetPowerUsageFunc: func() (uint32, nvml.Return) { return g.power, nvml.SUCCESS },
			GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) {
				return nvml.Memory{Total: g.total, Free: g.free, Used: g.total - g.free}, nvml.SUCCESS
			},
			GetUtilizationRatesFunc: func() (nvml.Utilization, nvml.Return) {
				return nvml.Utilization{Gpu: g.util}, nvml.SUCCESS
			},
			GetTotalEnergyConsumptionFunc: func() (uint64, nvml.Return) {
				if g.noEnergy {
					return 0, nvml.ERROR_NOT_SUPPORTED
				}
				return g.energy, nvml.SUCCESS
			},
		}
	}
	lib := &mock.Interface{
		InitFunc:           func() nvml.Return { return initRet },
		ShutdownFunc:       func() nvml.Return { return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { return len(devs), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			if i < 0 || i >= len(devs) {
				return nil, nvml.ERROR_INVALID_ARGUMENT
			}
			return devs[i], nvml.SUCCESS
		},
	}
	return lib, devs
}

// fakeClock is a settable clock for the snapshot cache.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

func TestOpenOutcomes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		init      nvml.Return
		gpus      int
		available bool
		says      string
	}{
		{"no library", nvml.ERROR_LIBRARY_NOT_FOUND, 0, false, "NVML library not found"},
		{"no driver", nvml.ERROR_DRIVER_NOT_LOADED, 0, false, "driver not loaded"},
		{"no devices", nvml.SUCCESS, 0, false, "no NVIDIA GPU"},
		{"permission", nvml.ERROR_NO_PERMISSION, 0, false, "NVML unusable"},
		{"driver and library of different versions", nvml.ERROR_LIB_RM_VERSION_MISMATCH, 0, false, "NVML unusable"},
		{"two GPUs", nvml.SUCCESS, 2, true, "2 GPU(s)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var gpus []*fakeGPU
			for i := 0; i < tc.gpus; i++ {
				gpus = append(gpus, &fakeGPU{name: "NVIDIA H100 80GB HBM3"})
			}
			lib, _ := fakeNVML(tc.init, gpus...)
			m := open(lib, newConfig(nil))
			if m.Available() != tc.available || !strings.Contains(m.String(), tc.says) {
				t.Fatalf("available %v, %q", m.Available(), m.String())
			}
			if !tc.available && tc.init == nvml.SUCCESS && len(lib.ShutdownCalls()) != 1 {
				t.Errorf("NVML not shut down after finding no GPU")
			}
		})
	}
}

func TestSnapshotAndEnergy(t *testing.T) {
	g0 := &fakeGPU{name: "NVIDIA H100 80GB HBM3", uuid: "GPU-aaaa", total: 80 << 30, free: 60 << 30, util: 35, power: 180500, energy: 1_000_000}
	g1 := &fakeGPU{name: "NVIDIA L4", uuid: "GPU-bbbb", total: 24 << 30, free: 24 << 30, util: 0, power: 16000, energy: 2_500}
	lib, devs := fakeNVML(nvml.SUCCESS, g0, g1)
	clock := &fakeClock{t: time.Unix(1000, 0)}
	cfg := newConfig([]Option{WithRefresh(5 * time.Second)})
	cfg.now = clock.now
	m := open(lib, cfg)
	want := []Info{
		{Index: 0, Name: "NVIDIA H100 80GB HBM3", UUID: "GPU-aaaa", VRAMTotal: 80 << 30, VRAMFree: 60 << 30, UtilPercent: 35, PowerMW: 180500},
		{Index: 1, Name: "NVIDIA L4", UUID: "GPU-bbbb", VRAMTotal: 24 << 30, VRAMFree: 24 << 30, UtilPercent: 0, PowerMW: 16000},
	}
	got := m.Snapshot()
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("snapshot %+v\nwant     %+v", got, want)
	}
	pg := ToProto(got)
	if pg[0].GetName() != "NVIDIA H100 80GB HBM3" || pg[0].GetVramFreeBytes() != 60<<30 || pg[1].GetPowerMw() != 16000 || pg[1].GetUuid() != "GPU-bbbb" {
		t.Fatalf("proto %v", pg)
	}

	// Within the refresh interval the cached figures are returned.
	g0.power, g0.free = 700000, 1<<30
	clock.t = clock.t.Add(4 * time.Second)
	if got := m.Snapshot(); got[0].PowerMW != 180500 || len(devs[0].GetPowerUsageCalls()) != 1 {
		t.Fatalf("cached snapshot re-read NVML: %+v", got[0])
	}
	got[0].Name = "changed by the caller"
	clock.t = clock.t.Add(time.Second)
	if got := m.Snapshot(); got[0].PowerMW != 700000 || got[0].VRAMFree != 1<<30 || got[0].Name != "NVIDIA H100 80GB HBM3" {
		t.Fatalf("refreshed snapshot %+v", got[0])
	}

	// Energy: fresh on every call, summed over GPUs.
	if e, ok := m.EnergyMJ(); !ok || e != 1_002_500 {
		t.Fatalf("EnergyMJ = %d, %v", e, ok)
	}
	g1.energy += 500
	if e, ok := m.EnergyMJ(); !ok || e != 1_003_000 {
		t.Fatalf("EnergyMJ = %d, %v", e, ok)
	}
	// One GPU's counter resets while the other's rises more: the sum
	// still rises, but the reading is not a true one; the next is.
	g0.energy, g1.energy = 5_000, g1.energy+2_000_000
	if e, ok := m.EnergyMJ(); ok {
		t.Fatalf("EnergyMJ = %d, ok across one GPU's reset", e)
	}
	g0.energy += 100
	if e, ok := m.EnergyMJ(); !ok || e != 5_100+2_003_000 {
		t.Fatalf("EnergyMJ after a reset = %d, %v", e, ok)
	}
	g1.noEnergy = true
	if _, ok := m.EnergyMJ(); ok {
		t.Fatal("EnergyMJ ok although one GPU has no counter")
	}

	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if n := len(lib.ShutdownCalls()); n != 1 {
		t.Fatalf("Shutdown called %d times", n)
	}
	if m.Available() || m.Snapshot() != nil {
		t.Fatal("closed monitor reports GPUs")
	}
	if _, ok := m.EnergyMJ(); ok {
		t.Fatal("closed monitor reports energy")
	}
}

func TestMeterOverMonitor(t *testing.T) {
	g := &fakeGPU{name: "NVIDIA H100 80GB HBM3", energy: 50_000}
	lib, _ := fakeNVML(nvml.SUCCESS, g)
	m := open(lib, newConfig(nil))
	defer m.Close()
	meter := NewMeter(m.EnergyMJ)
	tok := meter.Begin()
	g.energy += 12_345
	if mj, ok := meter.End(tok); !ok || mj != 12_345 {
		t.Fatalf("query energy %d, %v; want 12345", mj, ok)
	}
}
