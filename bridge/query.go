package bridge

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// peerHeader names the peer that answered; peer IDs are public, addresses
// never leave the bridge.
const peerHeader = "X-Mtor-Peer"

// mtorInfo is the "mtor" extension object of responses: who answered and
// how fast. OpenAI clients ignore it.
type mtorInfo struct {
	Peer      string `json:"peer"`
	Local     bool   `json:"local,omitempty"`
	Attempts  int    `json:"attempts"`
	Continued int    `json:"continued,omitempty"` // times another worker took the answer over
	// Writers are the workers whose output makes up a continued answer,
	// in order (absent when one worker wrote it all).
	Writers       []string `json:"writers,omitempty"`
	TTFTMs        uint32   `json:"ttft_ms"`
	TotalMs       uint32   `json:"total_ms"`
	QueueMs       uint32   `json:"queue_ms"`
	WorkerTTFTMs  uint32   `json:"worker_ttft_ms"`
	WorkerTotalMs uint32   `json:"worker_total_ms"`
	EnergyMJ      uint64   `json:"energy_mj,omitempty"`
	WorkerVersion string   `json:"worker_version,omitempty"`
}

func infoOf(res *router.Result) *mtorInfo {
	if res == nil {
		return nil
	}
	d := res.Done
	return &mtorInfo{
		Peer:          res.PeerString(),
		Local:         res.Local,
		Attempts:      res.Attempts,
		Continued:     res.Continued,
		Writers:       res.ContinuedBy(),
		TTFTMs:        res.TTFTMs,
		TotalMs:       res.TotalMs,
		QueueMs:       d.GetTiming().GetQueueMs(),
		WorkerTTFTMs:  d.GetTiming().GetTtftMs(),
		WorkerTotalMs: d.GetTiming().GetTotalMs(),
		EnergyMJ:      d.GetEnergyMj(),
		WorkerVersion: d.GetWorkerVersion(),
	}
}

// usage is OpenAI's token accounting.
type usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
	TotalTokens      uint64 `json:"total_tokens"` // a sum of two uint32: no wrap
}

func usageOf(res *router.Result) usage {
	u := res.Done.GetUsage()
	return usage{PromptTokens: u.GetPromptTokens(), CompletionTokens: u.GetCompletionTokens(), TotalTokens: uint64(u.GetPromptTokens()) + uint64(u.GetCompletionTokens())}
}

// decodeQuery reads a JSON body into req, translates it with toQuery and
// checks that the swarm serves its model; on any failure it has written
// the error and returns nil.
func decodeQuery[T any](s *Server, w http.ResponseWriter, r *http.Request, req *T, toQuery func(*T) (*pb.QueryRequest, *apiError)) *pb.QueryRequest {
	if err := s.decode(w, r, req); err != nil {
		writeError(w, err)
		return nil
	}
	q, aerr := toQuery(req)
	if aerr == nil {
		aerr = s.checkModel(q.Model, q.Type)
	}
	if aerr != nil {
		writeError(w, aerr)
		return nil
	}
	return q
}

// checkModel answers 404 for a model no peer serves and 400 for a model
// that does not serve query type t.
func (s *Server) checkModel(name string, t pb.QueryType) *apiError {
	m, ok := s.model(name)
	if !ok {
		return modelNotFound(name)
	}
	if slices.Contains(m.Types, protocol.TypeName(t)) {
		return nil
	}
	return badRequest("model", "model_type_unsupported", "The model %q does not serve %s queries (it serves %s).", name, protocol.TypeName(t), strings.Join(m.Types, ", "))
}

// defaultModel is the first model (by name) that serves t, for endpoints
// where OpenAI makes the model optional.
func (s *Server) defaultModel(t pb.QueryType) (string, *apiError) {
	var names []string
	for _, m := range s.swarm.Models() {
		if slices.Contains(m.Types, protocol.TypeName(t)) {
			names = append(names, m.Name)
		}
	}
	if len(names) == 0 {
		return "", &apiError{Status: http.StatusServiceUnavailable, Type: typeServer, Code: "no_capable_peer",
			Message: fmt.Sprintf("No peer of the swarm serves %s queries.", protocol.TypeName(t))}
	}
	slices.Sort(names)
	return names[0], nil
}

// queryWhole runs q for a response sent only once the answer is whole, so
// a worker dying mid-answer costs nothing: reset discards what was
// gathered and the router runs the query again on another worker.
func (s *Server) queryWhole(ctx context.Context, q *pb.QueryRequest, reset func(), h router.Handler) (*router.Result, *apiError) {
	return s.query(router.WithRestart(ctx), q, func(ev *pb.Event) error {
		if ev == nil {
			reset()
			return nil
		}
		return h(ev)
	})
}

// query validates q, gives it the bridge's deadline and runs it through the
// swarm with ctx, the request's context: a client that goes away cancels
// the query at the worker.
func (s *Server) query(ctx context.Context, q *pb.QueryRequest, h router.Handler) (*router.Result, *apiError) {
	if err := checkFrame(q); err != nil {
		return nil, err
	}
	if err := protocol.ValidateRequest(q); err != nil {
		if pe := protocol.AsError(err); pe.Code == protocol.CodeBadRequest {
			return nil, invalidRequest(pe, q.GetType())
		}
		return nil, fromProtocol(err, 0)
	}
	reqCtx := ctx
	ctx, cancel := context.WithTimeout(ctx, s.cfg.queryTimeout)
	defer cancel()
	if dl, ok := ctx.Deadline(); ok {
		q.DeadlineUnixMs = dl.UnixMilli()
	}
	start := time.Now()
	// No HTTP answer carries its receipt: its countersignature can wait
	// for the batch that returns it to its worker.
	res, err := s.swarm.Query(router.CountersignLater(ctx), q, h)
	if err != nil {
		ae := fromProtocol(err, s.cfg.retryAfter)
		if errors.Is(context.Cause(reqCtx), errBridgeStopping) {
			// Cut by the bridge's stop (its grace ran out), not by the
			// client (that cancels with a cause of its own), who is
			// still there to read why.
			ae = bridgeStopped(s.cfg.retryAfter)
		}
		s.log.Debugw("query failed", "type", protocol.TypeName(q.GetType()), "model", q.GetModel(), "status", ae.Status, "err", err, "after", time.Since(start))
		return nil, ae
	}
	if res == nil {
		return nil, &apiError{Status: http.StatusInternalServerError, Type: typeServer, Code: "internal_error", Message: "The swarm returned no result."}
	}
	return res, nil
}
