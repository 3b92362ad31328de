package bridge

import (
	"encoding/base64"
	"net/http"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

type imagesRequest struct {
	Prompt         string `json:"prompt"`
	Model          string `json:"model"`
	N              *int64 `json:"n"`
	Size           string `json:"size"`
	ResponseFormat string `json:"response_format"`
	OutputFormat   string `json:"output_format"`
	Seed           *int64 `json:"seed"` // not OpenAI's, but image servers take one
}

type imageData struct {
	B64JSON string `json:"b64_json,omitempty"`
	URL     string `json:"url,omitempty"`
}

type imagesResponse struct {
	Created int64       `json:"created"`
	Data    []imageData `json:"data"`
	Mtor    *mtorInfo   `json:"mtor,omitempty"`
}

// maxPrompt bounds text prompts of image and speech requests (OpenAI's
// larger limit).
const maxPrompt = 32000

func imagesToQuery(req *imagesRequest) (*pb.QueryRequest, *apiError) {
	if strings.TrimSpace(req.Prompt) == "" {
		return nil, badRequest("prompt", "missing_required_parameter", "Missing required parameter: 'prompt'.")
	}
	if len(req.Prompt) > maxPrompt {
		return nil, badRequest("prompt", "invalid_value", "'prompt' is %d bytes, limit %d.", len(req.Prompt), maxPrompt)
	}
	if req.N != nil && *req.N != 1 {
		return nil, badRequest("n", "unsupported_value", "Only n=1 is supported.")
	}
	switch req.ResponseFormat {
	case "", "b64_json", "url":
	default:
		return nil, badRequest("response_format", "invalid_value", "Invalid value for 'response_format': %q (want b64_json, or url for a data: URL).", req.ResponseFormat)
	}
	size := req.Size
	if size == "auto" {
		size = ""
	}
	q := &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_IMAGINE, Model: req.Model, Prompt: req.Prompt,
		Params: &pb.Params{Size: size, Format: req.OutputFormat}}
	if req.Seed != nil {
		q.Params.Seed = req.Seed
	}
	return q, nil
}

func (s *Server) handleImages(w http.ResponseWriter, r *http.Request) {
	var req imagesRequest
	if err := s.decode(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	q, aerr := imagesToQuery(&req)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	if q.Model == "" { // optional in OpenAI's API
		if q.Model, aerr = s.defaultModel(q.Type); aerr != nil {
			writeError(w, aerr)
			return
		}
	} else if aerr := s.checkModel(q.Model, q.Type); aerr != nil {
		writeError(w, aerr)
		return
	}
	var img *pb.Media
	res, aerr := s.queryWhole(r.Context(), q, func() { img = nil }, func(ev *pb.Event) error {
		if m := ev.GetMedia(); m != nil && img == nil && strings.HasPrefix(m.GetMime(), "image/") {
			img = m
		}
		return nil
	})
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	if img == nil {
		writeError(w, &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "backend_error", Message: "The worker returned no image."})
		return
	}
	b64 := base64.StdEncoding.EncodeToString(img.GetData())
	d := imageData{B64JSON: b64}
	if req.ResponseFormat == "url" {
		// The bridge hosts no files: the URL carries the image itself.
		d = imageData{URL: "data:" + img.GetMime() + ";base64," + b64}
	}
	info := infoOf(res)
	w.Header().Set(peerHeader, info.Peer)
	writeJSON(w, http.StatusOK, imagesResponse{Created: time.Now().Unix(), Data: []imageData{d}, Mtor: info})
}
