package router

import (
	"reflect"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestModelIsModelsEntry: Model(name) is exactly the entry of Models for
// that name, and absent for a model no live peer serves.
func TestModelIsModelsEntry(t *testing.T) {
	h := testHost(t)
	vision := func(a *pb.Announce) {
		a.Models[0].Types = []pb.QueryType{pb.QueryType_QUERY_TYPE_VISION, pb.QueryType_QUERY_TYPE_CHAT}
		a.Models[0].Features = []string{"tools", "logprobs"}
	}
	two := func(a *pb.Announce) {
		a.Models = append(a.Models, &pb.ModelInfo{Name: "e", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_EMBED}})
	}
	drainingOnly := func(a *pb.Announce) { a.Draining = true; a.Models[0].Name = "gone" }
	r := New(h, "/test", staticTable{
		cand("a", 0, 4, 100, 0), cand("b", 0, 4, 100, 0, vision, two),
		cand("c", 0, 4, 100, 0, func(a *pb.Announce) { a.Models[0].Features = []string{"logprobs", "continue"} }),
		cand("d", 0, 4, 100, 0, drainingOnly),
	})
	byName := map[string]ModelView{}
	for _, m := range r.Models() {
		byName[m.Name] = m
	}
	for _, name := range []string{"m", "e", "gone", "nobody"} {
		t.Run(name, func(t *testing.T) {
			want, wantOK := byName[name]
			got, ok := r.Model(name)
			if ok != wantOK || !reflect.DeepEqual(got, want) {
				t.Fatalf("Model(%q) = %+v, %v; Models has %+v, %v", name, got, ok, want, wantOK)
			}
		})
	}
	if m, _ := r.Model("m"); m.Peers != 3 {
		t.Fatalf("m served by %d peers, want 3", m.Peers)
	}
}
