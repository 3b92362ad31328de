package router

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// staticCatalog is a catalogue of fixed models, as staticTable is a table.
type staticCatalog []ModelView

func (c staticCatalog) CatalogModels() []ModelView { return slices.Clone(c) }

func (c staticCatalog) CatalogModel(name string) (ModelView, bool) {
	for _, m := range c {
		if m.Name == name {
			return m, true
		}
	}
	return ModelView{}, false
}

// Models and Model list the table's models as before, then those only the
// catalogue names, marked Catalog.
func TestModelsWithCatalog(t *testing.T) {
	h := testHost(t)
	table := staticTable{cand("w1", 0, 4, 100, 0), cand("w2", 0, 4, 100, 0)} // both serve "m"
	cat := staticCatalog{
		{Name: "m", Types: []string{"chat"}, Peers: 40},
		{Name: "other", Types: []string{"embed"}, Peers: 7},
	}
	for _, tc := range []struct {
		name  string
		opts  []Option
		want  []ModelView
		other bool // Model("other") found
	}{
		{"no catalogue", nil, []ModelView{{Name: "m", Types: []string{"chat"}, Peers: 2}}, false},
		{"with catalogue", []Option{WithCatalog(cat)}, []ModelView{
			{Name: "m", Types: []string{"chat"}, Peers: 2},
			{Name: "other", Types: []string{"embed"}, Peers: 7, Catalog: true},
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(h, "/test", table, tc.opts...)
			got := r.Models()
			if !slices.EqualFunc(got, tc.want, func(a, b ModelView) bool {
				return a.Name == b.Name && slices.Equal(a.Types, b.Types) && a.Peers == b.Peers && a.Catalog == b.Catalog
			}) {
				t.Fatalf("Models() = %+v, want %+v", got, tc.want)
			}
			if m, ok := r.Model("m"); !ok || m.Catalog || m.Peers != 2 {
				t.Fatalf("Model(m) = %+v, %v: the table's view, not the catalogue's", m, ok)
			}
			m, ok := r.Model("other")
			if ok != tc.other || (ok && !m.Catalog) {
				t.Fatalf("Model(other) = %+v, %v", m, ok)
			}
			if _, ok := r.Model("nobody"); ok {
				t.Fatal("Model(nobody) found")
			}
		})
	}
}

// lateProviders stands in for the DHT of a swarm whose only worker puts
// its provider record late (it joined over a lossy link): a look-up finds
// nothing before at, then the worker. Like discovery's, it returns what
// it found when ctx ends, with ctx's error if nothing.
type lateProviders struct {
	at time.Time
	ai peer.AddrInfo
}

func (l lateProviders) FindProviders(ctx context.Context, _ string, _ int) ([]peer.AddrInfo, error) {
	select {
	case <-time.After(time.Until(l.at)):
		return []peer.AddrInfo{l.ai}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// A model the swarm's catalogue lists has workers: a node that holds none
// of them waits up to providerWaitListed for the first provider record,
// not providerWait, and when none comes the query fails UNAVAILABLE
// (retry) rather than UNSUPPORTED (nobody serves it). A model the
// catalogue does not list, or lists for other query types only, is
// looked up for providerWait as before.
func TestProviderWaitForAListedModel(t *testing.T) {
	w := demoWorker(t, "late", 0)
	ai := peer.AddrInfo{ID: w.ID(), Addrs: w.Addrs()}
	chat := staticCatalog{{Name: "demo", Types: []string{"chat"}, Peers: 1, Catalog: true}}
	embed := staticCatalog{{Name: "demo", Types: []string{"embed"}, Peers: 1, Catalog: true}}
	for _, tc := range []struct {
		name     string
		cat      Catalog
		late     time.Duration // the record's delay; 0: never
		deadline time.Duration // the query's
		code     pb.ErrorCode  // 0: answered by the worker
		says     string
	}{
		{"listed: its late record is waited for", chat, providerWait + time.Second, 30 * time.Second, 0, ""},
		{"not listed: nobody serves it", nil, providerWait + time.Second, 30 * time.Second, protocol.CodeUnsupported, "no peer in the swarm serves model"},
		{"listed for another type: nobody serves it", embed, providerWait + time.Second, 30 * time.Second, protocol.CodeUnsupported, "no peer in the swarm serves model"},
		{"listed, never found: retry", chat, 0, 30 * time.Second, protocol.CodeUnavailable, "the swarm's catalogue lists model"},
		{"listed, never found before the deadline: retry", chat, 0, 3 * time.Second, protocol.CodeUnavailable, "the swarm's catalogue lists model"},
		{"listed while looked up: its late record is waited for", &laterCatalog{at: time.Now().Add(2 * time.Second), c: chat}, providerWait + 2*time.Second, 30 * time.Second, 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			providers := lateProviders{at: time.Now().Add(time.Hour), ai: ai}
			if tc.late > 0 {
				providers.at = time.Now().Add(tc.late)
			}
			opts := []Option{WithProviders(providers)}
			if tc.cat != nil {
				opts = append(opts, WithCatalog(tc.cat))
			}
			r := New(testHost(t), testProto, staticTable{}, opts...)
			ctx, cancel := context.WithTimeout(t.Context(), tc.deadline)
			defer cancel()
			res, err := r.Query(ctx, &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "hello"}, func(*pb.Event) error { return nil })
			if tc.code == 0 {
				if err != nil || res.Peer != w.ID() {
					t.Fatalf("query: %v, %v; want the worker's answer", res, err)
				}
				return
			}
			pe := protocol.AsError(err)
			if pe == nil || pe.Code != tc.code || !strings.Contains(pe.Message, tc.says) {
				t.Fatalf("error %v, want %s: %s", err, tc.code, tc.says)
			}
			// Within its bound, not at the query's deadline.
			if dl, _ := ctx.Deadline(); tc.deadline > providerWaitListed && !time.Now().Before(dl) {
				t.Fatalf("the look-up ran to the query's deadline (%s)", tc.deadline)
			}
		})
	}
}

// laterCatalog is c from at on, empty before: the catalogue of a view node
// that has just heard of a model's first worker.
type laterCatalog struct {
	at time.Time
	c  staticCatalog
}

func (l *laterCatalog) CatalogModels() []ModelView {
	if time.Now().Before(l.at) {
		return nil
	}
	return l.c.CatalogModels()
}

func (l *laterCatalog) CatalogModel(name string) (ModelView, bool) {
	if time.Now().Before(l.at) {
		return ModelView{}, false
	}
	return l.c.CatalogModel(name)
}
