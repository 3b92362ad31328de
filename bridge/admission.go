package bridge

import (
	"context"
	"net"
	"net/http"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// unknownCapacity is the admission limit while the peer table shows no
// worker's concurrency (none known yet, or only DHT providers): the router
// then answers fast, so there is nothing to protect.
const unknownCapacity = 16

// capacityOf is the swarm's concurrency: the sum of max_concurrency over
// the workers a query could go to now (serving a model, not draining, the
// breaker not open). Queued slots are left out on purpose: the bridge's
// own queue is fair across clients, a worker's queue is first come.
func capacityOf(peers []router.PeerView) int {
	n := 0
	for _, p := range peers {
		if len(p.Models) == 0 || p.Draining || p.Breaker == "open" {
			continue
		}
		n += max(int(p.MaxConcurrency), 1)
	}
	if n == 0 {
		return unknownCapacity
	}
	return n
}

// queued admits every query through the bridge's queue before it reaches
// the swarm, so that HTTP and WebSocket queries share the swarm's capacity
// fairly, and turns every BUSY into one with a retry hint.
type queued struct {
	Swarm
	q       *queue.Queue
	refused func(req *pb.QueryRequest) // counts a refusal in the metrics
	usage   *usageBook                 // per-client accounting
}

// Query implements Swarm.
func (s *queued) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	c := queue.ClientFrom(ctx)
	t, err := s.q.Enqueue(c.Key, c.Notify)
	if err != nil {
		s.refused(req)
		return nil, err
	}
	defer t.Done()
	if err := t.Wait(ctx); err != nil {
		if protocol.AsError(err).Code == protocol.CodeBusy {
			s.refused(req)
		}
		return nil, err
	}
	res, err := s.Swarm.Query(ctx, req, h)
	if err == nil && s.usage != nil {
		s.usage.record(c.Key, res)
	}
	return res, queue.AsBusy(err, s.q.RetryAfter())
}

// withClient names the client of an API request for the queue's fairness:
// its API key when the bridge has keys (the key is checked before this
// runs), else its IP address. Forwarding headers are not trusted for it.
func (s *Server) withClient(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := "ip:" + r.RemoteAddr
		if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
			key = "ip:" + host
		}
		if s.keys.enabled() {
			if k := bearer(r); k != "" {
				key = "key:" + s.keys.name(k)
			}
		}
		next.ServeHTTP(w, r.WithContext(queue.WithClient(r.Context(), queue.Client{Key: key})))
	})
}
