package bridge

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/http"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type embeddingsRequest struct {
	Model          string          `json:"model"`
	Input          json.RawMessage `json:"input"`
	EncodingFormat string          `json:"encoding_format"`
	Dimensions     *int64          `json:"dimensions"`
}

type embeddingObject struct {
	Object    string `json:"object"`
	Index     int    `json:"index"`
	Embedding any    `json:"embedding"` // []float32, or a base64 string of little-endian float32
}

type embeddingsResponse struct {
	Object string            `json:"object"`
	Data   []embeddingObject `json:"data"`
	Model  string            `json:"model"`
	Usage  struct {
		PromptTokens uint32 `json:"prompt_tokens"`
		TotalTokens  uint32 `json:"total_tokens"`
	} `json:"usage"`
	Mtor *mtorInfo `json:"mtor,omitempty"`
}

// embedToQuery translates an embeddings request.
func embedToQuery(req *embeddingsRequest) (*pb.QueryRequest, *apiError) {
	if req.Model == "" {
		return nil, badRequest("model", "missing_required_parameter", "Missing required parameter: 'model'.")
	}
	if isNull(req.Input) {
		return nil, badRequest("input", "missing_required_parameter", "Missing required parameter: 'input'.")
	}
	inputs, err := stringOrArray(req.Input, "input")
	if err != nil {
		return nil, badRequest("input", "invalid_type", "Invalid type for 'input': expected a string or an array of strings (token arrays are not supported).")
	}
	if len(inputs) == 0 {
		return nil, badRequest("input", "invalid_value", "'input' must not be empty.")
	}
	if len(inputs) > protocol.MaxInputs {
		return nil, badRequest("input", "invalid_value", "Too many inputs: %d, limit %d.", len(inputs), protocol.MaxInputs)
	}
	for i, in := range inputs {
		if in == "" {
			return nil, badRequest(fmt.Sprintf("input[%d]", i), "invalid_value", "'input[%d]' must not be empty.", i)
		}
	}
	switch req.EncodingFormat {
	case "", "float", "base64":
	default:
		return nil, badRequest("encoding_format", "invalid_value", "Invalid value for 'encoding_format': %q (want float or base64).", req.EncodingFormat)
	}
	if req.Dimensions != nil {
		return nil, badRequest("dimensions", "unsupported_value", "'dimensions' is not supported; models answer in their own dimension.")
	}
	return &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_EMBED, Model: req.Model, Inputs: inputs}, nil
}

// float32Base64 is how OpenAI encodes a vector for encoding_format base64.
func float32Base64(v []float32) string {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return base64.StdEncoding.EncodeToString(b)
}

func (s *Server) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	var req embeddingsRequest
	q := decodeQuery(s, w, r, &req, embedToQuery)
	if q == nil {
		return
	}
	vectors := make([][]float32, len(q.Inputs))
	res, aerr := s.queryWhole(r.Context(), q, func() { clear(vectors) }, func(ev *pb.Event) error {
		if e := ev.GetEmbedding(); e != nil {
			if i := int(e.GetIndex()); i < len(vectors) {
				vectors[i] = e.GetVector()
			}
		}
		return nil
	})
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	out := embeddingsResponse{Object: "list", Model: q.Model, Data: make([]embeddingObject, len(vectors)), Mtor: infoOf(res)}
	for i, v := range vectors {
		if v == nil {
			writeError(w, &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "backend_error",
				Message: fmt.Sprintf("The worker returned no embedding for input %d.", i)})
			return
		}
		var e any = v
		if req.EncodingFormat == "base64" {
			e = float32Base64(v)
		}
		out.Data[i] = embeddingObject{Object: "embedding", Index: i, Embedding: e}
	}
	out.Usage.PromptTokens = res.Done.GetUsage().GetPromptTokens()
	out.Usage.TotalTokens = out.Usage.PromptTokens
	w.Header().Set(peerHeader, out.Mtor.Peer)
	writeJSON(w, http.StatusOK, out)
}
