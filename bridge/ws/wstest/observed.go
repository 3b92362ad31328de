package wstest

import (
	"context"
	"sync/atomic"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Observed wraps a backend with counters: calls running now and calls cut
// short (cancelled, or their output refused once the stream was reset), as
// the worker's backend saw them.
type Observed struct {
	backend.Backend
	Running, Stopped *atomic.Int64
}

func (o Observed) Run(ctx context.Context, req *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	o.Running.Add(1)
	defer o.Running.Add(-1)
	u, err := o.Backend.Run(ctx, req, out)
	if err != nil {
		o.Stopped.Add(1)
	}
	return u, err
}
