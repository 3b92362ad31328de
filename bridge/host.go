package bridge

import (
	"net"
	"net/http"
	"strconv"

	"github.com/mtor-swarm/mtor/bridge/internal/sameorigin"
)

// hostGuard refuses, on a bridge without API keys, every request whose
// Host is not one of the bridge's own names (loopback, the address the
// connection arrived on, WithAllowedHosts): the defence against DNS
// rebinding, where a foreign page points its own name at 127.0.0.1 and
// the user's browser then treats the keyless bridge as that page's own
// origin (chat, /api/swarm and /ws all same-origin to it).
//
// With keys the guard is off: the keys protect /v1 and /ws whatever the
// Host, which is what a bridge reached under many names needs; what stays
// open (/api/swarm, the page) is open to any client anyway.
//
// /healthz stays unguarded: it tells nothing, and probes often name the
// host in ways nobody lists.
func (s *Server) hostGuard(next http.Handler) http.Handler {
	if s.keys.enabled() || s.hosts.Any() {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			next.ServeHTTP(w, r)
			return
		}
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		// A browser always sends Host; only a hand-made HTTP/1.0 request
		// has none, and it is no browser's doing.
		if r.Host != "" && !s.hosts.Allowed(r.Host, local) {
			writeErrorFor(w, r, hostNotAllowed(r.Host))
			return
		}
		// Behind a trusted proxy the forwarded host is the one the browser
		// used: it must be one of ours too, or the proxy would carry a
		// rebinding page's requests (the page, same-origin to itself, may
		// set the header at will).
		if s.cfg.trustFwdHost {
			if fh := sameorigin.ForwardedHost(r); fh != "" && !s.hosts.Allowed(fh, nil) {
				writeErrorFor(w, r, hostNotAllowed(fh))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func hostNotAllowed(host string) *apiError {
	return &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "host_not_allowed",
		Message: "Host " + quoteHost(host) + " is not a name this bridge serves. Without API keys it answers only to " +
			"localhost, loopback and its own addresses, and the names given with --bridge-host (a defence against DNS rebinding)."}
}

// quoteHost quotes a client-chosen header value for a message, cut short.
func quoteHost(h string) string {
	const max = 255
	if len(h) > max {
		h = h[:max] + "…"
	}
	return strconv.Quote(h)
}
