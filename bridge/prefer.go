package bridge

import (
	"net/http"

	"github.com/mtor-swarm/mtor/node/router"
)

// preferHeader chooses how the router ranks workers for one request:
// "energy" prefers the lowest measured joules per token among workers
// within the node's latency slack, "latency" ranks by expected latency
// alone; absent, the node's --prefer-energy decides.
const preferHeader = "X-Mtor-Prefer"

// parsePrefer reads the preference header; an unknown value is an error,
// not silently the default.
func parsePrefer(v string) (router.EnergyPreference, *apiError) {
	p, err := router.ParseEnergyPreference(v)
	if err != nil {
		return router.EnergyDefault, badRequest(preferHeader, "invalid_prefer",
			"The %s header must be \"energy\" or \"latency\", not %q.", preferHeader, v)
	}
	return p, nil
}

// withPreference puts the request's routing preference in its context.
func withPreference(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v := r.Header.Get(preferHeader)
		if v == "" {
			next.ServeHTTP(w, r)
			return
		}
		p, err := parsePrefer(v)
		if err != nil {
			writeError(w, err)
			return
		}
		next.ServeHTTP(w, r.WithContext(router.WithEnergyPreference(r.Context(), p)))
	})
}
