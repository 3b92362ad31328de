package node

import (
	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
)

// catalogAdapter shows discovery's model catalogue to the router, so that
// the model lists of a node without the swarm view (bridge, API) name the
// swarm's models, not only those it routed to. It lists nothing on a node
// with the swarm view.
type catalogAdapter struct{ d *discovery.Discovery }

func catalogView(m discovery.CatalogModel) router.ModelView {
	types := make([]string, len(m.Types))
	for i, t := range m.Types {
		types[i] = protocol.TypeName(t)
	}
	return router.ModelView{Name: m.Name, Types: types, Peers: m.Workers, Features: m.Features}
}

func (a catalogAdapter) CatalogModels() []router.ModelView {
	ms := a.d.Catalog()
	out := make([]router.ModelView, len(ms))
	for i, m := range ms {
		out[i] = catalogView(m)
	}
	return out
}

func (a catalogAdapter) CatalogModel(name string) (router.ModelView, bool) {
	m, ok := a.d.CatalogModel(name)
	if !ok {
		return router.ModelView{}, false
	}
	return catalogView(m), true
}

// WithCatalogReader says whether the node, without the swarm view, reads
// the swarm's model catalogue to list the models it has not routed to
// (default true; see discovery.WithCatalogReader).
func WithCatalogReader(on bool) Option {
	return WithDiscoveryOptions(discovery.WithCatalogReader(on))
}
