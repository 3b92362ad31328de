package ws

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// seedTypes are the query types in the order worker entries are listed,
// with the name the seed client uses for each. The seed knows chat, vision
// and imagine workers; its "speech" query type offers chat workers and, here,
// also speech-to-text models, which transcribe the recording.
var seedTypes = []struct {
	t    pb.QueryType
	name string
}{
	{pb.QueryType_QUERY_TYPE_CHAT, "chat"},
	{pb.QueryType_QUERY_TYPE_VISION, "vision"},
	{pb.QueryType_QUERY_TYPE_IMAGINE, "imagine"},
	{pb.QueryType_QUERY_TYPE_STT, "speech"},
	{pb.QueryType_QUERY_TYPE_TTS, "tts"},
	{pb.QueryType_QUERY_TYPE_EMBED, "embed"},
}

func seedTypeName(t pb.QueryType) string {
	for _, st := range seedTypes {
		if st.t == t {
			return st.name
		}
	}
	return protocol.TypeName(t)
}

// catalog is a snapshot of what the swarm serves, with the worker_update
// labels given to each (model, type).
type catalog struct {
	models  []router.ModelView
	types   map[string][]pb.QueryType // model -> types
	labels  map[string]label          // worker_update name -> model, type
	entries []workerEntry
	workers int // workers in the peer table
}

type label struct {
	model string
	t     pb.QueryType
}

// labelFor names a (model, type) entry. The seed client keys its worker list
// by name, so a model serving several types would collapse into one entry
// there; the model's first type keeps the bare name and the others get
// "model [type]". Submitting a label routes to the model.
func labelFor(model string, t pb.QueryType, primary bool) string {
	if primary {
		return model
	}
	return fmt.Sprintf("%s [%s]", model, seedTypeName(t))
}

func newCatalog(models []router.ModelView, peers []router.PeerView, now time.Time) *catalog {
	c := &catalog{types: map[string][]pb.QueryType{}, labels: map[string]label{}, workers: len(peers)}
	c.models = slices.Clone(models)
	sort.Slice(c.models, func(i, j int) bool { return c.models[i].Name < c.models[j].Name })
	for _, m := range c.models {
		var ts []pb.QueryType
		for _, name := range m.Types {
			t, err := protocol.ParseType(name)
			if err == nil && !slices.Contains(ts, t) {
				ts = append(ts, t)
			}
		}
		c.types[m.Name] = ts
		health, blacklisted, lastActive := peerStats(m.Name, peers, now)
		primary := true
		for _, st := range seedTypes {
			if !slices.Contains(ts, st.t) {
				continue
			}
			name := labelFor(m.Name, st.t, primary)
			primary = false
			if _, taken := c.labels[name]; !taken {
				c.labels[name] = label{m.Name, st.t}
			}
			c.entries = append(c.entries, workerEntry{
				Name:          name,
				Address:       "swarm",
				Type:          st.name,
				HealthScore:   health,
				IsBlacklisted: blacklisted,
				LastActive:    lastActive,
				Model:         m.Name,
				Peers:         m.Peers,
			})
		}
	}
	return c
}

// peerStats summarises the workers serving model: the best health among
// them, whether none is usable, and when one was last heard from.
func peerStats(model string, peers []router.PeerView, now time.Time) (health float64, blacklisted bool, lastActive string) {
	found, usable := false, false
	minAge := int64(-1)
	for _, p := range peers {
		if !slices.ContainsFunc(p.Models, func(m router.ModelStat) bool { return m.Name == model }) {
			continue
		}
		found = true
		h := float64(p.Health)
		if p.LocalHealth > 0 && p.LocalHealth < h {
			h = p.LocalHealth
		}
		if h > health {
			health = h
		}
		if p.Breaker != "open" && !p.Draining {
			usable = true
		}
		if minAge < 0 || p.AgeMs < minAge {
			minAge = p.AgeMs
		}
	}
	if !found {
		return 100, false, now.UTC().Format(time.RFC3339)
	}
	if minAge < 0 {
		minAge = 0
	}
	return health, !usable, now.Add(-time.Duration(minAge) * time.Millisecond).UTC().Format(time.RFC3339)
}

// serves reports whether model serves t.
func (c *catalog) serves(model string, t pb.QueryType) bool {
	return slices.Contains(c.types[model], t)
}

// resolve picks the model for a query of type t asked for as name: the model
// itself, a worker_update label, or, as the seed did (it routed by type
// alone), the model serving t on the most workers.
func (c *catalog) resolve(name string, t pb.QueryType) (string, error) {
	name = strings.TrimSpace(name)
	if c.serves(name, t) {
		return name, nil
	}
	if l, ok := c.labels[name]; ok && c.serves(l.model, t) {
		return l.model, nil
	}
	best, bestPeers := "", -1
	for _, m := range c.models {
		if c.serves(m.Name, t) && m.Peers > bestPeers {
			best, bestPeers = m.Name, m.Peers
		}
	}
	if best == "" {
		return "", protocol.Errorf(protocol.CodeUnsupported, "no model in the swarm serves %s queries", protocol.TypeName(t))
	}
	return best, nil
}

// signature changes when the worker list a client sees changes in a way
// that matters to it (health and times are left out: pushing those would
// reset the seed client's model picker every few seconds).
func (c *catalog) signature() string {
	var b strings.Builder
	for _, e := range c.entries {
		fmt.Fprintf(&b, "%s\x00%s\x00%t\x00%d\n", e.Name, e.Type, e.IsBlacklisted, e.Peers)
	}
	return b.String()
}
