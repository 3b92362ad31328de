package node_test

import (
	"context"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// fakeGPUs stands in for NVML, which needs a GPU this machine lacks.
type fakeGPUs struct{}

func (fakeGPUs) GPUs() []*pb.GPU {
	return []*pb.GPU{{Name: "Fake H100", Uuid: "GPU-fake", VramTotalBytes: 80 << 30, VramFreeBytes: 70 << 30, UtilPercent: 12, PowerMw: 90000}}
}

// fakeEnergy charges every query 2 J, as a GPU energy counter would report.
type fakeEnergy struct{}

func (fakeEnergy) Begin() func() (uint64, bool) { return func() (uint64, bool) { return 2000, true } }

func TestGPUAndEnergyReachThePeerTable(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.Clients(1),
		swarmtest.NodeOptions(node.WithGPU(fakeGPUs{}, fakeEnergy{})))
	client := s.Clients[0]
	_, res, err := ask(context.Background(), client, chat("demo", "how much energy"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Done.GetEnergyMj() != 2000 {
		t.Fatalf("energy_mj = %d, want 2000", res.Done.GetEnergyMj())
	}
	w := s.Workers[0].ID().String()
	waitFor(t, 10*time.Second, func() bool {
		for _, p := range client.Router().Peers() {
			if p.Peer == w && len(p.GPUs) == 1 && p.GPUs[0].Name == "Fake H100" && p.GPUs[0].PowerMW == 90000 &&
				len(p.Models) == 1 && p.Models[0].JoulesPerToken > 0 {
				return true
			}
		}
		return false
	}, "the worker's GPU and joules per token in the client's peer table")
}
