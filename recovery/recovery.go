// Package recovery resolves the one-ACTIVE-token-per-key constraint when
// tokens for one key race: it consumes the events the persister could not
// insert, and in one transaction per batch keeps the newest token ACTIVE,
// makes the older INACTIVE, and gives every token a row.
package recovery

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// Config tunes the recovery role.
type Config = consume.Settings

// Metrics are recovery's Prometheus series.
type Metrics struct {
	Resolved    prometheus.Counter
	Deactivated prometheus.Counter
	// BatchSeconds is the time to resolve and commit a batch, retries
	// included: with the persister's commit time, what a conflict waits.
	BatchSeconds prometheus.Histogram
	BatchSize    prometheus.Histogram
	Retries      *prometheus.CounterVec
	DeadLettered prometheus.Counter
	// SettleFailures counts acknowledgements that failed, by operation.
	SettleFailures *prometheus.CounterVec
}

// NewMetrics registers recovery's series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Resolved:       prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_recovery_conflicts_resolved_total", Help: "Conflicting tokens given a row."}),
		Deactivated:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_recovery_tokens_deactivated_total", Help: "ACTIVE tokens made INACTIVE by a newer token."}),
		Retries:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_recovery_retries_total", Help: "Recovery transaction retries by reason."}, []string{"reason"}),
		DeadLettered:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_recovery_dead_lettered_total", Help: "Poison conflict events moved to the dead-letter subject."}),
		BatchSeconds:   prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_recovery_batch_duration_seconds", Help: "Time to resolve and commit a batch of conflicts, retries included, or to give it up.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 15)}),
		BatchSize:      prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_recovery_batch_size", Help: "Distinct conflicting tokens per batch.", Buckets: prometheus.ExponentialBuckets(1, 2, 14)}),
		SettleFailures: stream.NewFailures("recovery"),
	}
	reg.MustRegister(m.Resolved, m.Deactivated, m.BatchSeconds, m.BatchSize, m.Retries, m.DeadLettered, m.SettleFailures)
	return m
}

// DB is what recovery needs from a pool.
type DB = store.Beginner

// Recovery is the conflict-resolving consumer.
type Recovery struct {
	cfg     Config
	db      DB
	js      jetstream.JetStream
	log     *slog.Logger
	metrics *Metrics
}

// New returns a recovery consumer; Run starts it.
func New(cfg Config, db DB, js jetstream.JetStream, log *slog.Logger, m *Metrics) *Recovery {
	return &Recovery{cfg: cfg, db: db, js: js, log: log, metrics: m}
}

// Run consumes conflicts until ctx is cancelled, then finishes its batches.
func (r *Recovery) Run(ctx context.Context) error {
	cons, err := r.js.Consumer(ctx, r.cfg.Topology.Stream, r.cfg.Topology.Recovery)
	if err != nil {
		return fmt.Errorf("recovery: open consumer %s: %w", r.cfg.Topology.Recovery, err)
	}
	r.log.Info("recovery started", "workers", r.cfg.Pool.Workers, "consumer", r.cfg.Topology.Recovery)
	err = r.cfg.NewPool(cons, r.js, r.log, r.HandleBatch, r.metrics.SettleFailures, r.metrics.DeadLettered).Run(ctx)
	r.log.Info("recovery stopped")
	return err
}

// HandleBatch resolves a batch of conflict events in one transaction and
// returns each message's verdict.
func (r *Recovery) HandleBatch(ctx context.Context, msgs []jetstream.Msg) []stream.Verdict {
	verdicts := make([]stream.Verdict, len(msgs))
	var incoming []Incoming
	var settle []int
	seen := map[events.Digest]int{}
	for i, m := range msgs {
		ev, err := events.DecodeTokenIssued(m.Data())
		if err != nil {
			verdicts[i] = stream.DeadLetter(err.Error())
			continue
		}
		seq, err := strconv.ParseUint(m.Headers().Get(events.HeaderOriginSeq), 10, 64)
		if err != nil || seq == 0 {
			verdicts[i] = stream.DeadLetter("conflict event without a valid " + events.HeaderOriginSeq + " header")
			continue
		}
		settle = append(settle, i)
		if j, ok := seen[ev.TokenDigest]; ok {
			incoming[j].Seq = min(incoming[j].Seq, seq)
			continue
		}
		seen[ev.TokenDigest] = len(incoming)
		incoming = append(incoming, Incoming{Event: ev, Seq: seq})
	}
	if len(incoming) == 0 {
		return verdicts
	}
	start := time.Now()
	d, err := store.Retry(ctx, r.cfg.Retry, func(ctx context.Context) (Decision, error) {
		return Apply(ctx, r.db, incoming, func(s []Superseded) error { return r.notify(ctx, s) })
	}, func(reason string, err error, wait time.Duration) {
		r.metrics.Retries.WithLabelValues(reason).Inc()
		r.log.Warn("recovery transaction failed; retrying", "reason", reason, "err", err, "retry_in", wait)
	})
	r.metrics.BatchSeconds.Observe(time.Since(start).Seconds())
	v := stream.Ack()
	if err != nil {
		r.log.Error("conflicts not resolved; returning them for redelivery", "err", err, "events", len(incoming))
		v = stream.Nak(r.cfg.NakDelay)
	} else {
		r.metrics.BatchSize.Observe(float64(len(incoming)))
		r.metrics.Resolved.Add(float64(len(d.Insert)))
		r.metrics.Deactivated.Add(float64(len(d.Deactivate)))
		for _, s := range d.Deactivate {
			r.log.Info("token deactivated", "token_digest", s.Digest.String(), "superseded_by", s.By.String(), "client_id", s.Key.ClientID)
		}
	}
	for _, i := range settle {
		verdicts[i] = v
	}
	return verdicts
}

// Apply resolves incoming conflict events in one transaction: every token gets
// a row, the newest of each key is ACTIVE. notify runs before the commit with
// the rows being deactivated; if it fails nothing is written. Applying the
// same events again changes nothing.
func Apply(ctx context.Context, db DB, incoming []Incoming, notify func([]Superseded) error) (Decision, error) {
	var d Decision
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		var err error
		d, err = resolveTx(ctx, tx, incoming, notify)
		return err
	})
	return d, err
}

// notify publishes the deactivation notices of one transaction.
func (r *Recovery) notify(ctx context.Context, rows []Superseded) error {
	return PublishDeactivations(ctx, r.js, r.cfg.Topology, rows)
}

// NoticeTimeout bounds the wait for JetStream to acknowledge the
// deactivation notices. The wait happens inside the transaction that holds
// the keys' row locks, and the persister's inserts on those keys queue
// behind it; a publish the stream's leader took down with it when it died is
// never answered, so without a bound the locks were held for the whole
// attempt (30 s), stalling persistence after every leader loss. On timeout
// the transaction rolls back and is retried; the notices' message ids make
// the re-publish a duplicate where the first one did get stored.
const NoticeTimeout = 5 * time.Second

// PublishDeactivations publishes a TokenDeactivated notice for each row and
// waits (at most NoticeTimeout) until JetStream holds them all. The message
// id is the deactivated token's digest, so a repeated notice (redelivery,
// replay) is deduplicated.
func PublishDeactivations(ctx context.Context, js jetstream.JetStream, topo events.Topology, rows []Superseded) error {
	ctx, cancel := context.WithTimeout(ctx, NoticeTimeout)
	defer cancel()
	now := time.Now().UTC()
	futures := make([]jetstream.PubAckFuture, 0, len(rows))
	for _, s := range rows {
		body, err := events.EncodeTokenDeactivated(&events.TokenDeactivated{
			TokenDigest: s.Digest, ClientID: s.Key.ClientID, Subject: s.Key.Subject, Scope: s.Key.Scope,
			Reason: "superseded", SupersededBy: s.By, DeactivatedAt: now,
		})
		if err != nil {
			return err
		}
		f, err := js.PublishAsync(topo.DeactivatedSubject(), body,
			jetstream.WithMsgID("deactivated-"+s.Digest.String()),
			jetstream.WithExpectStream(topo.Stream))
		if err != nil {
			return fmt.Errorf("publish deactivation of %s: %w", s.Digest.String()[:12], err)
		}
		futures = append(futures, f)
	}
	if err := stream.WaitAcks(ctx, futures); err != nil {
		return fmt.Errorf("deactivation notices: %w", err)
	}
	return nil
}
