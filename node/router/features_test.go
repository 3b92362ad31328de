package router

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func features(fs ...string) func(*pb.Announce) {
	return func(a *pb.Announce) { a.Models[0].Features = fs }
}

// TestRankNeedKeepsOnlyCapablePeers: a query that needs tools or JSON
// output goes only to peers whose model announces the feature.
func TestRankNeedKeepsOnlyCapablePeers(t *testing.T) {
	h := testHost(t)
	r := New(h, "/test", staticTable{
		cand("plain", 0, 4, 100, 0),
		cand("tools", 0, 4, 100, 0, features("tools")),
		cand("all", 0, 4, 100, 0, features("continue", "tools", "json_schema", "logprobs")),
	})
	cases := []struct {
		need    []string
		want    string // peers, sorted
		lacking bool
	}{
		{nil, "all,plain,tools", false},
		{[]string{"tools"}, "all,tools", true},
		{[]string{"tools", "json_schema"}, "all", true},
		{[]string{"json_object"}, "", true},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.need, "+"), func(t *testing.T) {
			rk := r.rankNeed("m", pb.QueryType_QUERY_TYPE_CHAT, c.need)
			ranked, known, lacking := rk.ranked, rk.known, rk.lacking
			var got []string
			for _, s := range ranked {
				got = append(got, string(s.Peer))
			}
			slices.Sort(got)
			if strings.Join(got, ",") != c.want || !known || lacking != c.lacking {
				t.Fatalf("ranked %v known %v lacking %v, want %s lacking %v", got, known, lacking, c.want, c.lacking)
			}
		})
	}
	if ms := r.Models(); len(ms) != 1 || strings.Join(ms[0].Features, ",") != "continue,json_schema,logprobs,tools" {
		t.Fatalf("Models = %+v, want the union of the features", ms)
	}
}

// TestQueryNeedingAMissingFeatureIsRefused: no peer is tried, and the
// error says which features are missing (the bridge answers 400 from it).
func TestQueryNeedingAMissingFeatureIsRefused(t *testing.T) {
	h := testHost(t)
	r := New(h, "/test", staticTable{cand("plain", 0, 4, 100, 0, features("continue"))})
	req := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "m",
		Messages:       []*pb.Message{{Role: "user", Content: "hi"}},
		ResponseFormat: &pb.ResponseFormat{Type: "json_object"}}
	_, err := r.Query(context.Background(), req, func(*pb.Event) error { return nil })
	var fe *FeatureError
	if !errors.As(err, &fe) || strings.Join(fe.Features, ",") != "json_object" || fe.Model != "m" {
		t.Fatalf("err = %v, want a FeatureError for json_object", err)
	}
	if pe := protocol.AsError(err); pe.Code != protocol.CodeUnsupported {
		t.Fatalf("code = %v, want UNSUPPORTED", pe.Code)
	}
}
