package protocol

import (
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Bounds of a catalogue (pb.Catalog): what one publisher can make a
// receiver hold is at most MaxCatalogModels names for MaxCatalogTTL.
const (
	// MaxCatalog bounds a catalogue on the gossip topic. 512 names of
	// typical length (tens of bytes) take well under half of it; a
	// publisher leaves out the models with fewest workers to fit.
	MaxCatalog        = 64 << 10
	MaxCatalogModels  = 512
	MaxCatalogWorkers = 65535
	MinCatalogTTL     = time.Second
	MaxCatalogTTL     = 10 * time.Minute
)

// CatalogTopic is the gossipsub topic on which nodes with the swarm view
// publish the swarm's model catalogue (pb.Catalog) for those without it.
func CatalogTopic(swarm string) string {
	if swarm == "" {
		swarm = DefaultSwarm
	}
	return "/mtor/" + swarm + "/catalog/1"
}

// ValidateCatalog checks a catalogue against now. Everything a receiver
// keeps of it is bounded here: the number of models, each name, its types
// and features, and the worker count (which only informs people, but an
// absurd one is a lie no honest publisher tells).
func ValidateCatalog(c *pb.Catalog, now time.Time) error {
	if c.GetTimeUnixMs() <= 0 {
		return badRequest("catalog without a time")
	}
	if err := validateStamp("catalog", c.GetTimeUnixMs(), c.GetTtlMs(), MinCatalogTTL, MaxCatalogTTL, now); err != nil {
		return err
	}
	if len(c.GetModels()) > MaxCatalogModels {
		return badRequest("catalog of %d models, limit %d", len(c.GetModels()), MaxCatalogModels)
	}
	seen := make(map[string]bool, len(c.GetModels()))
	for _, m := range c.GetModels() {
		if err := ValidateModelName(m.GetName()); err != nil {
			return err
		}
		if seen[m.GetName()] {
			return badRequest("catalog lists model %q twice", m.GetName())
		}
		seen[m.GetName()] = true
		if len(m.GetTypes()) == 0 || len(m.GetTypes()) > len(typeNames)-1 {
			return badRequest("catalog model %q has %d types", m.GetName(), len(m.GetTypes()))
		}
		for _, t := range m.GetTypes() {
			if t <= 0 || int(t) >= len(typeNames) {
				return badRequest("catalog model %q has unknown type %d", m.GetName(), t)
			}
		}
		if m.GetWorkers() == 0 || m.GetWorkers() > MaxCatalogWorkers {
			return badRequest("catalog model %q has %d workers, want 1..%d", m.GetName(), m.GetWorkers(), MaxCatalogWorkers)
		}
		if len(m.GetFeatures()) > MaxFeatures {
			return badRequest("catalog model %q has %d features, limit %d", m.GetName(), len(m.GetFeatures()), MaxFeatures)
		}
		for _, f := range m.GetFeatures() {
			if f == "" || len(f) > MaxFeatureLen {
				return badRequest("catalog model %q has an invalid feature", m.GetName())
			}
		}
	}
	return nil
}
