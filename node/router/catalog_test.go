package router

import (
	"slices"
	"testing"
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
