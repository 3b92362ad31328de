package bridge

import "net/http"

// mountUI mounts /ws and / (packages bridge/ws and bridge/webui) and
// returns the WebSocket handler and its connection count.
func (s *Server) mountUI(mux *http.ServeMux) (http.Handler, func() int) {
	return nil, nil
}
