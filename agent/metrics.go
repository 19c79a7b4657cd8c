package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the agent's Prometheus metrics, in a registry of its own.
type metrics struct {
	reg        *prometheus.Registry
	migrations *prometheus.CounterVec   // by role and outcome
	bytes      *prometheus.CounterVec   // page bytes by direction
	rounds     prometheus.Counter       // pre-copy and final rounds run here (source)
	downtime   prometheus.Histogram     // committed migrations (target)
	inFlight   prometheus.GaugeFunc     // migrations not yet settled here
	durations  *prometheus.HistogramVec // rounds and restores, by step
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_migrations_total",
			Help: "Migrations settled on this node, by this node's role (source, target) and outcome (committed, rolled-back).",
		}, []string{"role", "outcome"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_migration_page_bytes_total",
			Help: "Page bytes of migrations, sent by rounds (sent) or served in post-copy (served).",
		}, []string{"direction"}),
		rounds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ferry_migration_rounds_total",
			Help: "Migration rounds (pre-copy and final) run on this node as a source.",
		}),
		downtime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "ferry_migration_downtime_seconds",
			Help:    "Downtime of the migrations committed to this node: from the source's final freeze to the tree running here.",
			Buckets: []float64{.005, .01, .02, .05, .1, .2, .5, 1, 2, 5},
		}),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ferry_migration_step_seconds",
			Help:    "Duration of migration steps on this node: round, final-round, restore, post-copy.",
			Buckets: prometheus.ExponentialBuckets(.005, 2.5, 10),
		}, []string{"step"}),
	}
	m.inFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ferry_migrations_in_flight",
		Help: "Migrations on this node that are not settled yet.",
	}, func() float64 { return float64(a.inFlight()) })
	m.reg.MustRegister(m.migrations, m.bytes, m.rounds, m.downtime, m.durations, m.inFlight)
	return m
}

func (m *metrics) step(name string, d time.Duration) {
	m.durations.WithLabelValues(name).Observe(d.Seconds())
}

// ServeMetrics serves /metrics on addr until ctx ends.
func (a *Agent) ServeMetrics(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	a.log.Info("agent: metrics", "address", l.Addr().String())
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("agent: metrics server", "err", err)
		}
	}()
	return nil
}

func (a *Agent) inFlight() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, m := range a.migs {
		if !terminal(m.rec.State) {
			n++
		}
	}
	return n
}
