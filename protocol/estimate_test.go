package protocol

import (
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestEstimateScore(t *testing.T) {
	mi := &pb.ModelInfo{Name: "m"}
	announce := func(inFlight, slots, health uint32) *pb.Announce {
		return &pb.Announce{Health: health, Load: &pb.Load{InFlight: inFlight, MaxConcurrency: slots}, Models: []*pb.ModelInfo{mi}}
	}
	tests := []struct {
		name string
		a    *pb.Announce
		rtt  time.Duration
		want float64
	}{
		{"idle: the default TTFT", announce(0, 2, 100), 0, 100},
		{"plus the RTT", announce(0, 2, 100), 20 * time.Millisecond, 120},
		{"half busy", announce(1, 2, 100), 0, 150},
		{"full: queues for a slot", announce(2, 2, 100), 0, 100*2 + 1000.0/2},
		{"half healthy", announce(0, 2, 50), 0, 200},
		{"unhealthy: floored", announce(0, 2, 0), 0, 100 / minHealth},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := AnnouncedEstimate(tc.a, mi, tc.rtt).Score(); got != tc.want {
				t.Fatalf("score %v, want %v", got, tc.want)
			}
		})
	}
}

func TestClearlyBetter(t *testing.T) {
	tests := []struct {
		a, b float64
		want bool
	}{
		{100, 700, true},
		{100, 211, true},
		{100, 210, false}, // twice and the slack: not clearly
		{60, 120, false},
		{1, 5, false}, // a few ms apart
		{100, 100, false},
		{700, 100, false},
	}
	for _, tc := range tests {
		if got := ClearlyBetter(tc.a, tc.b); got != tc.want {
			t.Errorf("ClearlyBetter(%v, %v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
