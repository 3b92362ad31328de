package router

// Catalog lists the models a node knows of without holding their workers:
// the swarm's model catalogue, on a node without the swarm view
// (discovery.Discovery.Catalog). Peers is the number of workers the
// catalogue's publishers counted; the router sets Catalog on its views.
type Catalog interface {
	CatalogModels() []ModelView
	CatalogModel(name string) (ModelView, bool)
}

// WithCatalog adds c's models to Models and Model, after those of the
// table: a model the table holds a worker of is shown as the table has it.
// A query for a model known only from c finds its workers as any model
// missing from the table does (WithProviders).
func WithCatalog(c Catalog) Option { return func(r *Router) { r.catalog = c } }

// withCatalog appends to out (the table's models) the catalogue's others.
func (r *Router) withCatalog(out []ModelView) []ModelView {
	if r.catalog == nil {
		return out
	}
	have := make(map[string]bool, len(out))
	for _, m := range out {
		have[m.Name] = true
	}
	for _, m := range r.catalog.CatalogModels() {
		if !have[m.Name] {
			m.Catalog = true
			out = append(out, m)
		}
	}
	return out
}
