//go:build !cgo

package gpu

import "testing"

func TestStubReportsNoGPU(t *testing.T) {
	m := Open(WithRefresh(0))
	if m.Available() || m.Snapshot() != nil {
		t.Fatal("a build without cgo reports GPUs")
	}
	if _, ok := m.EnergyMJ(); ok {
		t.Fatal("a build without cgo reports energy")
	}
	if _, ok := NewMeter(m.EnergyMJ).End(NewMeter(m.EnergyMJ).Begin()); ok {
		t.Fatal("energy measured without a counter")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}
