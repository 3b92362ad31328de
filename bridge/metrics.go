package bridge

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// metrics are the bridge's Prometheus series.
type metrics struct {
	queries  *prometheus.CounterVec   // type, model, outcome
	duration *prometheus.HistogramVec // type
	ttft     *prometheus.HistogramVec // type
	inFlight prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry, s Swarm, conns func() int, qstats func() queue.Stats, bodyBytes func() int64) (*metrics, error) {
	m := &metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mtor_bridge_queries_total",
			Help: "Queries the bridge sent to the swarm, by query type, model and outcome (ok or the error code).",
		}, []string{"type", "model", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "mtor_bridge_query_duration_seconds",
			Help:    "Time from sending a query to the swarm until it ended, by query type.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 12), // 10 ms .. ~10 min
		}, []string{"type"}),
		ttft: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "mtor_bridge_ttft_seconds",
			Help:    "Time from sending a query until its first output (token, media or embedding), by query type.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 11), // 5 ms .. ~8 min
		}, []string{"type"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "mtor_bridge_in_flight",
			Help: "Queries the bridge is running now.",
		}),
	}
	cs := []prometheus.Collector{
		m.queries, m.duration, m.ttft, m.inFlight,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mtor_swarm_peers",
			Help: "Worker peers (serving at least one model) in this node's peer table.",
		}, func() float64 { return float64(countWorkers(s)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mtor_bridge_connections",
			Help: "Open WebSocket connections.",
		}, func() float64 { return float64(conns()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mtor_bridge_queue_waiting",
			Help: "Queries waiting in the bridge's queue for a slot in the swarm.",
		}, func() float64 { return float64(qstats().Waiting) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mtor_bridge_queue_limit",
			Help: "Queries the bridge admits into the swarm at once (its capacity, or --bridge-max-in-flight).",
		}, func() float64 { return float64(qstats().Limit) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mtor_bridge_queue_refused_total",
			Help: "Queries refused as busy by the bridge's queue: full, or waited too long.",
		}, func() float64 { s := qstats(); return float64(s.Refused + s.Expired) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mtor_bridge_body_bytes",
			Help: "Bytes of request bodies the bridge holds now, out of its budget (WithMaxBodyInFlight).",
		}, func() float64 { return float64(bodyBytes()) }),
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	// A registry shared with the node may carry these already.
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			return nil, err
		}
	}
	return m, nil
}

// instrumented wraps a Swarm so that every query through it, from the
// OpenAI API or the WebSocket, is counted and timed.
type instrumented struct {
	Swarm
	m     *metrics
	model func(name string) (router.ModelView, bool) // modelFinder
}

// Query implements Swarm.
func (s *instrumented) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	typ := protocol.TypeName(req.GetType())
	s.m.inFlight.Inc()
	defer s.m.inFlight.Dec()
	start := time.Now()
	first := false
	res, err := s.Swarm.Query(ctx, req, func(ev *pb.Event) error {
		switch ev.GetKind().(type) {
		case *pb.Event_Chunk, *pb.Event_Media, *pb.Event_Embedding:
			if !first {
				first = true
				s.m.ttft.WithLabelValues(typ).Observe(time.Since(start).Seconds())
			}
		}
		return h(ev)
	})
	s.m.duration.WithLabelValues(typ).Observe(time.Since(start).Seconds())
	outcome := "ok"
	if err != nil {
		outcome = strings.ToLower(protocol.CodeName(protocol.AsError(err).Code))
	}
	s.m.queries.WithLabelValues(typ, s.modelLabel(req.GetModel()), outcome).Inc()
	return res, err
}

// modelLabel keeps the model label's cardinality bounded by what the swarm
// serves: any other name a client sends is "other".
func (s *instrumented) modelLabel(name string) string {
	if _, ok := s.model(name); ok {
		return name
	}
	return "other"
}

// refused counts a query the bridge's queue refused as busy.
func (s *instrumented) refused(req *pb.QueryRequest) {
	s.m.queries.WithLabelValues(protocol.TypeName(req.GetType()), s.modelLabel(req.GetModel()), "busy").Inc()
}
