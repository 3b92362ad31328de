package bridge

import (
	"net/http"
	"slices"
	"strings"

	"github.com/mtor-swarm/mtor/node/router"
)

// ownedBy is the owner every model is listed with.
const ownedBy = "mtor swarm"

type modelExt struct {
	Types []string `json:"types"`
	Peers int      `json:"peers"`
	// Catalog: known from the swarm's model catalogue only (a bridge
	// without the swarm view that has not routed to the model yet).
	Catalog bool `json:"catalog,omitempty"`
}

type modelObject struct {
	ID      string    `json:"id"`
	Object  string    `json:"object"`
	Created int64     `json:"created"`
	OwnedBy string    `json:"owned_by"`
	Mtor    *modelExt `json:"mtor,omitempty"`
}

type modelList struct {
	Object string        `json:"object"`
	Data   []modelObject `json:"data"`
}

func (s *Server) modelObject(m router.ModelView) modelObject {
	types := m.Types
	if types == nil {
		types = []string{}
	}
	return modelObject{ID: m.Name, Object: "model", Created: s.started.Unix(), OwnedBy: ownedBy,
		Mtor: &modelExt{Types: types, Peers: m.Peers, Catalog: m.Catalog}}
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	models := s.swarm.Models()
	slices.SortFunc(models, func(a, b router.ModelView) int { return strings.Compare(a.Name, b.Name) })
	list := modelList{Object: "list", Data: make([]modelObject, 0, len(models))}
	for _, m := range models {
		list.Data = append(list.Data, s.modelObject(m))
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	for _, m := range s.swarm.Models() {
		if m.Name == id {
			writeJSON(w, http.StatusOK, s.modelObject(m))
			return
		}
	}
	writeError(w, modelNotFound(id))
}

// handleUnknown answers paths and methods under /v1 that the bridge does
// not serve, in OpenAI's error shape.
func (s *Server) handleUnknown(w http.ResponseWriter, r *http.Request) {
	known := map[string]string{
		"/v1/models":               http.MethodGet,
		"/v1/chat/completions":     http.MethodPost,
		"/v1/embeddings":           http.MethodPost,
		"/v1/images/generations":   http.MethodPost,
		"/v1/audio/transcriptions": http.MethodPost,
		"/v1/audio/speech":         http.MethodPost,
		"/v1/usage":                http.MethodGet,
	}
	if m, ok := known[r.URL.Path]; ok {
		w.Header().Set("Allow", m)
		writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: typeInvalidRequest, Code: "method_not_allowed",
			Message: "Method " + r.Method + " is not allowed on " + r.URL.Path + "; use " + m + "."})
		return
	}
	writeError(w, &apiError{Status: http.StatusNotFound, Type: typeInvalidRequest, Code: "unknown_url",
		Message: "Unknown endpoint " + r.Method + " " + r.URL.Path + "."})
}
