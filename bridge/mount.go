package bridge

import (
	"net/http"

	"github.com/mtor-swarm/mtor/bridge/webui"
	"github.com/mtor-swarm/mtor/bridge/ws"
)

// mountUI mounts the WebSocket (/ws) and the web UI (/). The WebSocket
// queries through the instrumented swarm, so they are counted like the
// API's, and shares the CORS list as its Origin allow-list and the
// X-Forwarded-Host setting as its same-origin rule.
func (s *Server) mountUI(mux *http.ServeMux) {
	opts := []ws.Option{
		ws.WithAllowedOrigins(s.cfg.corsOrigins),
		ws.WithQueryTimeout(s.cfg.queryTimeout),
		ws.WithTrustForwardedHost(s.cfg.trustFwdHost),
	}
	s.ws = ws.New(s.swarm, append(opts, s.cfg.wsOpts...)...)
	mux.Handle("/ws", s.wsAuth(s.ws))
	mux.Handle("/", webui.Handler())
}

// wsAuth checks the API key of a WebSocket handshake: the Authorization
// header, or ?key= since browsers cannot set headers on a WebSocket.
func (s *Server) wsAuth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := s.keys.check(r, r.URL.Query().Get("key")); err != nil {
			writeError(w, err)
			return
		}
		next.ServeHTTP(w, r)
	})
}
