// Package cleanup deletes what the token service no longer needs: token rows
// whose every credential expired long ago, refresh rotations of expired
// refresh tokens, and revocations older than any token they could cover.
//
// It works in small batches, each its own short transaction, skips rows that
// another transaction holds, and pauses between batches, so it can run next
// to the persisters without stalling them.
package cleanup

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Config tunes the cleanup. Zero fields take the defaults of DefaultConfig.
type Config struct {
	// Retention is how long a token row is kept after its last credential
	// (the refresh token if it has one, else the access token) expired, and
	// a refresh rotation after its refresh token expired. Expired tokens are
	// already refused by their own exp claim; the margin is for clock skew
	// and for people reading recent history.
	Retention time.Duration
	// RevocationRetention is how long family and grant revocations are kept.
	// A revocation is what refuses a token whose row is still queued, and
	// what revokes a refresh token (its family), so it must outlive every
	// token it can cover: it must exceed the refresh token lifetime
	// (TOKENPIPE_REFRESH_TTL, 720h by default), the longest any token lives.
	// The default, 744h (31 days), is that lifetime plus a day.
	RevocationRetention time.Duration
	// BatchSize is the most rows one batch (one transaction) deletes.
	BatchSize int
	// Pause is the wait between batches, which leaves the database to the
	// persisters most of the time. Negative for none.
	Pause time.Duration
}

// DefaultConfig is the configuration a zero Config stands for.
func DefaultConfig() Config {
	return Config{Retention: 24 * time.Hour, RevocationRetention: 744 * time.Hour, BatchSize: 1000, Pause: 50 * time.Millisecond}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.Retention == 0 {
		c.Retention = d.Retention
	}
	if c.RevocationRetention == 0 {
		c.RevocationRetention = d.RevocationRetention
	}
	if c.BatchSize <= 0 {
		c.BatchSize = d.BatchSize
	}
	if c.Pause == 0 {
		c.Pause = d.Pause
	}
	return c
}

// Stats counts what a pass deleted.
type Stats struct {
	Tokens          int64 // rows deleted from tokens
	Rotations       int64 // refresh rotations deleted
	Exchanges       int64 // token exchanges deleted
	RevokedFamilies int64 // family revocations deleted
	RevokedGrants   int64 // grant revocations deleted
	Batches         int   // delete statements run
}

// Total is the number of rows deleted from every table.
func (s Stats) Total() int64 {
	return s.Tokens + s.Rotations + s.Exchanges + s.RevokedFamilies + s.RevokedGrants
}

// What is due, and how a batch deletes it without waiting on the persisters,
// is in the statements (internal/store, cleanup.go there).

// Table labels, as in the metrics.
const (
	TableTokens          = store.TableTokens
	TableRotations       = store.TableRotations
	TableExchanges       = store.TableExchanges
	TableRevokedFamilies = store.TableRevokedFamilies
	TableRevokedGrants   = store.TableRevokedGrants
)

// Pass deletes everything that is due, batch by batch, and returns what it
// deleted. progress, if not nil, is called after every batch with the totals
// so far. Transient database errors are retried (see store.Retry); an error
// stops the pass and is returned with the totals of the batches committed
// before it.
func Pass(ctx context.Context, db *pgxpool.Pool, cfg Config, progress func(Stats)) (Stats, error) {
	cfg = cfg.withDefaults()
	var st Stats
	// One cutoff per pass, from the database's clock.
	tokenCutoff, revocationCutoff, err := store.CleanupCutoffs(ctx, db, cfg.Retention, cfg.RevocationRetention)
	if err != nil {
		return st, fmt.Errorf("cleanup: %w", err)
	}
	tables := []struct {
		name   string
		cutoff time.Time
		count  *int64
	}{
		{TableTokens, tokenCutoff, &st.Tokens},
		{TableRotations, tokenCutoff, &st.Rotations},
		{TableExchanges, tokenCutoff, &st.Exchanges},
		{TableRevokedFamilies, revocationCutoff, &st.RevokedFamilies},
		{TableRevokedGrants, revocationCutoff, &st.RevokedGrants},
	}
	paused := false
	for _, t := range tables {
		from := time.Time{} // keyset position: the last batch's latest expiry
		for {
			if paused {
				if err := sleep(ctx, cfg.Pause); err != nil {
					return st, fmt.Errorf("cleanup %s: %w", t.name, err)
				}
			}
			n, last, err := store.DeleteExpired(ctx, db, store.DefaultRetryPolicy(), t.name, t.cutoff, from, cfg.BatchSize)
			if err != nil {
				return st, fmt.Errorf("cleanup %s (batch %d of this pass): %w", t.name, st.Batches+1, err)
			}
			st.Batches++
			*t.count += int64(n)
			if progress != nil {
				progress(st)
			}
			paused = true
			// A short batch means nothing is left that is due and unlocked;
			// rows skipped as locked go in the next pass.
			if n < cfg.BatchSize {
				break
			}
			from = last
		}
	}
	return st, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Metrics are the cleanup's Prometheus series.
type Metrics struct {
	RowsDeleted *prometheus.CounterVec
	PassSeconds prometheus.Histogram
}

// NewMetrics registers the cleanup's series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		RowsDeleted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenpipe_cleanup_rows_deleted_total", Help: "Rows deleted by the cleanup job, by table."}, []string{"table"}),
		PassSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenpipe_cleanup_pass_seconds", Help: "Duration of a cleanup pass, pauses included.", Buckets: prometheus.ExponentialBuckets(0.01, 2, 16)}),
	}
	for _, t := range []string{TableTokens, TableRotations, TableExchanges, TableRevokedFamilies, TableRevokedGrants} {
		m.RowsDeleted.WithLabelValues(t) // export zeros from the start
	}
	reg.MustRegister(m.RowsDeleted, m.PassSeconds)
	return m
}

// add counts the rows deleted between two progress reports.
func (m *Metrics) add(prev, cur Stats) {
	if m == nil {
		return
	}
	for _, d := range []struct {
		table string
		n     int64
	}{
		{TableTokens, cur.Tokens - prev.Tokens},
		{TableRotations, cur.Rotations - prev.Rotations},
		{TableExchanges, cur.Exchanges - prev.Exchanges},
		{TableRevokedFamilies, cur.RevokedFamilies - prev.RevokedFamilies},
		{TableRevokedGrants, cur.RevokedGrants - prev.RevokedGrants},
	} {
		if d.n > 0 {
			m.RowsDeleted.WithLabelValues(d.table).Add(float64(d.n))
		}
	}
}

// Run runs a pass at once and then every `every` until ctx ends. A failed
// pass is logged and the next one tries again. It returns when ctx ends; the
// caller runs it in a goroutine of its own if it has other work. m may be
// nil; every <= 0 means hourly.
func Run(ctx context.Context, db *pgxpool.Pool, cfg Config, every time.Duration, log *slog.Logger, m *Metrics) {
	cfg = cfg.withDefaults()
	if every <= 0 {
		every = time.Hour
	}
	log.Info("cleanup started", "every", every, "retention", cfg.Retention,
		"revocation_retention", cfg.RevocationRetention, "batch_size", cfg.BatchSize, "pause", cfg.Pause)
	for {
		start := time.Now()
		var prev Stats
		st, err := Pass(ctx, db, cfg, func(cur Stats) { m.add(prev, cur); prev = cur })
		elapsed := time.Since(start)
		if ctx.Err() != nil {
			log.Info("cleanup stopped", "tokens", st.Tokens, "rotations", st.Rotations)
			return
		}
		if m != nil {
			m.PassSeconds.Observe(elapsed.Seconds())
		}
		attrs := []any{"tokens", st.Tokens, "rotations", st.Rotations, "exchanges", st.Exchanges, "revoked_families", st.RevokedFamilies,
			"revoked_grants", st.RevokedGrants, "batches", st.Batches, "seconds", elapsed.Seconds()}
		if err != nil {
			log.Error("cleanup pass failed", append(attrs, "err", err)...)
		} else {
			log.Info("cleanup pass done", attrs...)
		}
		if sleep(ctx, every) != nil {
			log.Info("cleanup stopped")
			return
		}
	}
}
