package router

import (
	"context"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Reputation is how far this node trusts a worker's answers to come from
// the model it announces, as honesty spot checks (package canary) found.
type Reputation interface {
	// Score is 0..100; a peer never checked scores 100.
	Score(p peer.ID) float64
	// Distrusted reports whether p is below the threshold under which it
	// gets no traffic.
	Distrusted(p peer.ID) bool
}

// WithReputation weighs peers by rep when ranking them and leaves
// distrusted peers out.
func WithReputation(rep Reputation) Option { return func(r *Router) { r.rep = rep } }

// WithQueryObserver has f called with each query Query routes (not those
// of QueryPeer), before it is sent; f must not block. Spot checks size
// their share of the traffic with it.
func WithQueryObserver(f func(*pb.QueryRequest)) Option { return func(r *Router) { r.observer = f } }

// Self is this node's peer ID.
func (r *Router) Self() peer.ID { return r.h.ID() }

// reputation is p's reputation, 0..100; this node trusts itself.
func (r *Router) reputation(p peer.ID) float64 {
	if r.rep == nil || p == r.h.ID() {
		return 100
	}
	return r.rep.Score(p)
}

// distrusted reports whether p is excluded from routing for its answers.
func (r *Router) distrusted(p peer.ID) bool {
	return r.rep != nil && p != r.h.ID() && r.rep.Distrusted(p)
}

func (r *Router) observe(req *pb.QueryRequest) {
	if r.observer != nil {
		r.observer(req)
	}
}

// CanaryPeers lists the workers that announce model for t and could take
// a query now (not draining, breaker not open), distrusted ones included
// so that they can earn their reputation back. This node comes first when
// its own worker serves the model.
func (r *Router) CanaryPeers(model string, t pb.QueryType) []peer.ID {
	cands := r.candidates(model)
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []peer.ID
	for _, c := range cands {
		if modelInfo(c.Announce, model, t) == nil || c.Announce.GetDraining() {
			continue
		}
		if c.Peer == r.h.ID() && r.local == nil {
			continue
		}
		st := r.state(c.Peer)
		if st.unreachableLocked(c) || !st.tracker.Available() {
			continue
		}
		if c.Peer == r.h.ID() {
			out = append([]peer.ID{c.Peer}, out...)
			continue
		}
		out = append(out, c.Peer)
	}
	return out
}

// QueryPeer sends req to the worker p only: no other worker is tried and
// p's reputation does not matter (spot checks use it). Its outcome counts
// towards p's health as any query's does. req gets a random id and the
// default deadline when it has none.
func (r *Router) QueryPeer(ctx context.Context, p peer.ID, req *pb.QueryRequest, h Handler) (*Result, error) {
	start := time.Now()
	ctx, cancel, err := r.prepare(ctx, req, start)
	if err != nil {
		return nil, err
	}
	defer cancel()
	var cand *Candidate
	for _, c := range r.table.Candidates() {
		if c.Peer == p {
			cand = &c
			break
		}
	}
	if cand == nil || modelInfo(cand.Announce, req.GetModel(), req.GetType()) == nil {
		return nil, protocol.Errorf(protocol.CodeUnsupported, "peer %s does not announce model %q for %s", ShortID(p), req.GetModel(), protocol.TypeName(req.GetType()))
	}
	q := &query{req: req, h: h, tried: map[tryKey]bool{}}
	res, err := r.attempt(ctx, scored{Candidate: *cand}, q)
	if err != nil {
		return nil, protocol.AsError(err)
	}
	res.Attempts = 1
	res.TotalMs = uint32(time.Since(start).Milliseconds())
	return res, nil
}
