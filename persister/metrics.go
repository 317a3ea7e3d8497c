package persister

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// Metrics are the persister's Prometheus series.
type Metrics struct {
	Batches            prometheus.Counter
	Rows               prometheus.Counter
	Duplicates         prometheus.Counter
	ConflictsForwarded prometheus.Counter
	BatchSize          prometheus.Histogram
	CommitSeconds      prometheus.Histogram
	Retries            *prometheus.CounterVec
	Redeliveries       prometheus.Counter
	DeadLettered       prometheus.Counter
	SettleFailures     *prometheus.CounterVec
}

// NewMetrics registers the persister's series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Batches:            prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_batches_total", Help: "Batches committed."}),
		Rows:               prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_rows_persisted_total", Help: "Token rows inserted."}),
		Duplicates:         prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_duplicates_total", Help: "Events whose row already existed (redelivery, replay)."}),
		ConflictsForwarded: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_conflicts_forwarded_total", Help: "Events sent to recovery because their key had an older ACTIVE row."}),
		BatchSize:          prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_persister_batch_size", Help: "Distinct tokens per committed batch.", Buckets: prometheus.ExponentialBuckets(1, 2, 14)}),
		CommitSeconds:      prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_persister_commit_duration_seconds", Help: "Time to write and commit a batch, retries included.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 15)}),
		Retries:            prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_persister_retries_total", Help: "Batch write retries by reason."}, []string{"reason"}),
		Redeliveries:       prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_redeliveries_total", Help: "Events delivered more than once."}),
		DeadLettered:       prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_persister_dead_lettered_total", Help: "Poison events moved to the dead-letter subject."}),
		SettleFailures:     stream.NewFailures("persister"),
	}
	reg.MustRegister(m.Batches, m.Rows, m.Duplicates, m.ConflictsForwarded, m.BatchSize, m.CommitSeconds, m.Retries, m.Redeliveries, m.DeadLettered, m.SettleFailures)
	return m
}
