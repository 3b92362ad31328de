// Package gpu is the node's GPU telemetry: each NVIDIA GPU's name, UUID,
// memory, utilisation and power draw for announcements, and the total-energy
// counter from which Meter derives the energy of each query.
//
// It reads NVML through github.com/NVIDIA/go-nvml, which loads
// libnvidia-ml.so at run time (cgo, dlopen). A machine without an NVIDIA
// driver is the normal case, not a failure: Open then returns a Monitor that
// reports no GPUs. A binary built with CGO_ENABLED=0 gets the same no-GPU
// Monitor (nvml_stub.go), so static builds work.
//
// See docs/gpu.md for the energy apportioning rule and what has been
// measured.
package gpu

import (
	"time"

	logging "github.com/ipfs/go-log/v2"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

var log = logging.Logger("mtor/gpu")

// DefaultRefresh is how long a Snapshot is reused before NVML is read again.
const DefaultRefresh = 5 * time.Second

// Info is one GPU as last read.
type Info struct {
	Index       int
	Name        string
	UUID        string
	VRAMTotal   uint64 // bytes
	VRAMFree    uint64 // bytes
	UtilPercent uint32 // GPU utilisation over NVML's last sample period, 0..100
	PowerMW     uint32 // power draw, milliwatts
}

// Proto is the announcement form of i.
func (i Info) Proto() *pb.GPU {
	return &pb.GPU{
		Name:           i.Name,
		Uuid:           i.UUID,
		VramTotalBytes: i.VRAMTotal,
		VramFreeBytes:  i.VRAMFree,
		UtilPercent:    i.UtilPercent,
		PowerMw:        i.PowerMW,
	}
}

// ToProto converts a snapshot for an announcement, keeping at most as many
// GPUs as an announcement may carry.
func ToProto(infos []Info) []*pb.GPU {
	if len(infos) > protocol.MaxAnnGPUs {
		infos = infos[:protocol.MaxAnnGPUs]
	}
	out := make([]*pb.GPU, 0, len(infos))
	for _, i := range infos {
		out = append(out, i.Proto())
	}
	return out
}

type config struct {
	refresh time.Duration
	now     func() time.Time
}

// Option configures Open.
type Option func(*config)

// WithRefresh sets how long a Snapshot is reused (0 reads NVML every call).
func WithRefresh(d time.Duration) Option { return func(c *config) { c.refresh = d } }

func newConfig(opts []Option) config {
	c := config{refresh: DefaultRefresh, now: time.Now}
	for _, o := range opts {
		o(&c)
	}
	return c
}
