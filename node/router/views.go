package router

import (
	"slices"
	"sort"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/node/relayaddr"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Workers counts the peers that serve at least one model. It takes only
// the peer table's lock, not the router's: /healthz and metrics ask it
// while a burst of queries is being routed.
func (r *Router) Workers() int {
	n := 0
	for _, c := range r.table.Candidates() {
		if len(c.Announce.GetModels()) > 0 {
			n++
		}
	}
	return n
}

// Peers is the swarm's workers as people see them: no addresses. Nodes
// that serve no model (bootstrap, bridge or relay only) are left out.
func (r *Router) Peers() []PeerView {
	cands := r.table.Candidates()
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]PeerView, 0, len(cands))
	for _, c := range cands {
		a := c.Announce
		if len(a.GetModels()) == 0 {
			continue
		}
		st := r.state(c.Peer)
		v := PeerView{
			Peer:           c.Peer.String(),
			Self:           c.Peer == r.h.ID(),
			Version:        a.GetVersion(),
			Roles:          append([]string{}, a.GetRoles()...),
			Models:         []ModelStat{},
			GPUs:           []GPUView{},
			InFlight:       a.GetLoad().GetInFlight(),
			MaxConcurrency: a.GetLoad().GetMaxConcurrency(),
			Queued:         a.GetLoad().GetQueued(),
			LocalInFlight:  st.inflight,
			Health:         a.GetHealth(),
			LocalHealth:    st.tracker.Score(),
			Breaker:        st.tracker.State().String(),
			Draining:       a.GetDraining(),
			RTTMs:          float64(c.RTT.Microseconds()) / 1000,
			RTTRelayed:     c.RTTRelayed,
			AgeMs:          now.Sub(c.Received).Milliseconds(),
			Unreachable:    st.unreachableLocked(c),
			Reputation:     r.reputation(c.Peer),
			Distrusted:     r.distrusted(c.Peer),
		}
		v.Path, v.Relay, v.Transports, v.HolePunched, v.Connections = r.path(c.Peer)
		v.Reachability, v.RelayedVia = Reachability(a.GetAddrs())
		for _, m := range a.GetModels() {
			ms := ModelStat{
				Name: m.GetName(), Types: typeNames(m.GetTypes()), Backend: m.GetBackend(),
				ContextLength: m.GetContextLength(), TokensPerSec: m.GetTokensPerSec(),
				P50TTFTMs: m.GetP50TtftMs(), JoulesPerToken: m.GetJoulesPerToken(),
			}
			if mt := st.models[m.GetName()]; mt != nil {
				if b := mt.State(); b != health.Closed {
					ms.Breaker = b.String()
				}
			}
			v.Models = append(v.Models, ms)
		}
		for _, g := range a.GetGpus() {
			v.GPUs = append(v.GPUs, GPUView{
				Name: g.GetName(), UUID: g.GetUuid(), VRAMTotal: g.GetVramTotalBytes(),
				VRAMFree: g.GetVramFreeBytes(), UtilPercent: g.GetUtilPercent(), PowerMW: g.GetPowerMw(),
			})
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}

// Models lists every model served by a peer that is not draining, with
// the union of its types and the number of peers serving it, then the
// models known only from the catalogue (WithCatalog).
func (r *Router) Models() []ModelView {
	type agg struct {
		types    map[pb.QueryType]bool
		features map[string]bool
		peers    int
	}
	byName := map[string]*agg{}
	for _, c := range r.table.Candidates() {
		if c.Announce.GetDraining() {
			continue
		}
		for _, m := range c.Announce.GetModels() {
			a := byName[m.GetName()]
			if a == nil {
				a = &agg{types: map[pb.QueryType]bool{}, features: map[string]bool{}}
				byName[m.GetName()] = a
			}
			a.peers++
			for _, t := range m.GetTypes() {
				a.types[t] = true
			}
			for _, f := range m.GetFeatures() {
				a.features[f] = true
			}
		}
	}
	out := make([]ModelView, 0, len(byName))
	for name, a := range byName {
		var ts []pb.QueryType
		for t := range a.types {
			ts = append(ts, t)
		}
		sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
		var fs []string
		for f := range a.features {
			fs = append(fs, f)
		}
		sort.Strings(fs)
		out = append(out, ModelView{Name: name, Types: typeNames(ts), Peers: a.peers, Features: fs})
	}
	out = r.withCatalog(out)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Model is Models' view of one model, without building every other's:
// the bridge checks the model of each query it takes. ok is false when no
// live peer serves it and the catalogue (WithCatalog) does not name it.
func (r *Router) Model(name string) (v ModelView, ok bool) {
	var ts []pb.QueryType
	var fs []string
	for _, c := range r.candidates(name) {
		if c.Announce.GetDraining() {
			continue
		}
		for _, m := range c.Announce.GetModels() {
			if m.GetName() != name {
				continue
			}
			v.Peers++
			for _, t := range m.GetTypes() {
				if !slices.Contains(ts, t) {
					ts = append(ts, t)
				}
			}
			for _, f := range m.GetFeatures() {
				if !slices.Contains(fs, f) {
					fs = append(fs, f)
				}
			}
		}
	}
	if v.Peers == 0 {
		if r.catalog != nil {
			if v, ok := r.catalog.CatalogModel(name); ok {
				v.Catalog = true
				return v, true
			}
		}
		return ModelView{}, false
	}
	slices.Sort(ts)
	slices.Sort(fs)
	v.Name, v.Types, v.Features = name, typeNames(ts), fs
	return v, true
}

func typeNames(ts []pb.QueryType) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = protocol.TypeName(t)
	}
	return out
}

// path is how this node is connected to p: the connection libp2p would
// choose (a direct one before a relayed one), the relay of a relayed one,
// the transports of the direct ones, whether a direct one was made by a
// hole punch, and how many connections it has to p.
func (r *Router) path(p peer.ID) (kind, relay string, transports []string, punched bool, conns int) {
	if p == r.h.ID() {
		return "", "", nil, false, 0
	}
	cs := r.h.Network().ConnsToPeer(p)
	for _, c := range cs {
		if !relayaddr.IsRelayed(c) {
			if kind != "direct" {
				kind, relay = "direct", ""
			}
			if t := c.ConnState().Transport; t != "" && !slices.Contains(transports, t) {
				transports = append(transports, t)
			}
			punched = punched || (r.punches != nil && r.punches.HolePunched(c))
			continue
		}
		if kind == "direct" {
			continue
		}
		kind = "relayed"
		if rp, err := c.RemoteMultiaddr().ValueForProtocol(ma.P_P2P); err == nil {
			relay = rp
		}
	}
	slices.Sort(transports)
	return kind, relay, transports, punched, len(cs)
}

// Reachability is how others reach a peer that announces addrs (binary
// multiaddrs): "relayed" with the relays' peer IDs when it announces
// relayed addresses, else "public" for a public address, "private" for
// private or loopback ones only, "" for none.
func Reachability(addrs [][]byte) (kind string, via []string) {
	public, private := false, false
	for _, b := range addrs {
		m, err := ma.NewMultiaddrBytes(b)
		if err != nil {
			continue
		}
		if relayaddr.IsCircuit(m) {
			if rp, err := m.ValueForProtocol(ma.P_P2P); err == nil && !slices.Contains(via, rp) {
				via = append(via, rp)
			}
			continue
		}
		if manet.IsPublicAddr(m) {
			public = true
		} else {
			private = true
		}
	}
	switch {
	case len(via) > 0:
		return "relayed", via
	case public:
		return "public", nil
	case private:
		return "private", nil
	}
	return "", nil
}
