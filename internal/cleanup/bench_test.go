package cleanup_test

import (
	"context"
	"log/slog"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/cleanup"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/persister"
)

const (
	benchExpired = 400_000 // expired rows in the table before each drain
	benchFresh   = 100_000 // TokenIssued events each drain persists
)

// benchRuns alternates which drain goes first, across iterations and across
// -count runs alike.
var benchRuns atomic.Int64

// BenchmarkPersisterWithCleanup measures the persister draining fresh events
// into a table full of expired rows, alone and with a cleanup pass deleting
// those rows at the same time, from the same starting table each time:
//
//	go test -run '^$' -bench PersisterWithCleanup -benchtime 1x -count 3 ./cleanup/
//
// ratio is with_cleanup_rows/s over alone_rows/s (median over iterations);
// the cleanup job must keep it at 0.8 or more.
func BenchmarkPersisterWithCleanup(b *testing.B) {
	url, pool := testenv.Database(b)
	ctx := context.Background()
	// The cleanup job is a process of its own, with a pool of its own.
	cleanPool, err := pgxpool.New(ctx, url)
	testenv.Must(b, err, "cleanup pool")
	b.Cleanup(cleanPool.Close)
	_, js, _ := testenv.JetStream(b)
	cfg := cleanup.Config{Retention: 24 * time.Hour, BatchSize: 1000, Pause: 10 * time.Millisecond}
	// An unmeasured warm-up drain first: the first drain of a process on a
	// new database runs markedly slower, whichever of the two it is.
	drainRun(b, pool, cleanPool, js, cfg, benchFresh/10, benchExpired/10, false)

	var alone, with, ratios, deleted []float64
	for range b.N {
		withFirst := benchRuns.Add(1)%2 == 0
		var rate [2]float64 // alone, with cleanup
		var gone int64
		for _, withCleanup := range []bool{withFirst, !withFirst} {
			r, n := drainRun(b, pool, cleanPool, js, cfg, benchFresh, benchExpired, withCleanup)
			if withCleanup {
				rate[1], gone = r, n
			} else {
				rate[0] = r
			}
		}
		if gone == 0 {
			b.Fatal("cleanup deleted no rows during the drain: the measurement says nothing")
		}
		alone, with = append(alone, rate[0]), append(with, rate[1])
		ratios, deleted = append(ratios, rate[1]/rate[0]), append(deleted, float64(gone))
		b.Logf("alone %.0f rows/s, with cleanup %.0f rows/s (%d expired rows deleted meanwhile), ratio %.2f, with-cleanup drain first: %v",
			rate[0], rate[1], gone, rate[1]/rate[0], withFirst)
	}
	b.ReportMetric(median(alone), "alone_rows/s")
	b.ReportMetric(median(with), "with_cleanup_rows/s")
	b.ReportMetric(median(ratios), "ratio")
	b.ReportMetric(median(deleted), "deleted_rows")
	b.ReportMetric(0, "ns/op") // the setup dominates the time per op: not a measurement
}

// drainRun resets the table to nExpired expired rows, fills a stream of its
// own with nFresh events, and times a persister draining it, with a
// cleanup pass running meanwhile if withCleanup. It returns rows per second
// and the rows cleanup deleted before the drain ended.
func drainRun(b *testing.B, pool, cleanPool *pgxpool.Pool, js jetstream.JetStream, cfg cleanup.Config, nFresh, nExpired int, withCleanup bool) (float64, int64) {
	b.Helper()
	ctx := context.Background()
	topo := testenv.Topology()
	stream, err := events.Provision(ctx, js, topo)
	testenv.Must(b, err, "provision stream")
	defer func() {
		if err := js.DeleteStream(context.Background(), topo.Stream); err != nil {
			b.Errorf("delete stream %s: %v", topo.Stream, err)
		}
	}()
	testenv.Must(b, bench.Fill(ctx, js, topo, bench.MakeEvents(nFresh), nil), "fill stream")
	fillExpired(b, pool, nExpired)

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var gone atomic.Int64
	cleanupDone := make(chan error, 1)
	finishedEarly := false
	if withCleanup {
		go func() {
			_, err := cleanup.Pass(runCtx, cleanPool, cfg, func(s cleanup.Stats) { gone.Store(s.Tokens) })
			cleanupDone <- err
		}()
	} else {
		cleanupDone = nil // never ready
	}
	p := persister.New(persister.Config{
		Pool:     consume.Config{Workers: 2, BatchSize: 1000, BatchWait: 20 * time.Millisecond},
		Retry:    store.DefaultRetryPolicy(),
		Topology: topo, Finish: 10 * time.Second, NakDelay: time.Second,
	}, pool, js, slog.New(slog.DiscardHandler), persister.NewMetrics(prometheus.NewRegistry()))
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- p.Run(runCtx) }()
	cons, err := stream.Consumer(ctx, topo.Persister)
	testenv.Must(b, err, "persister consumer")
	// Poll the consumer, not the table: every event acked means every row
	// committed, and counting rows would load the database being measured.
	for {
		info, err := cons.Info(ctx)
		testenv.Must(b, err, "consumer info")
		if info.NumPending == 0 && info.NumAckPending == 0 && info.Delivered.Stream > 0 && info.AckFloor.Stream >= info.Delivered.Stream {
			break
		}
		select {
		case err := <-done:
			b.Fatalf("persister stopped early: %v", err)
		case err := <-cleanupDone:
			testenv.Must(b, err, "cleanup pass")
			finishedEarly = true
			cleanupDone = nil
		case <-time.After(25 * time.Millisecond):
		}
	}
	elapsed := time.Since(start)
	n := gone.Load()
	stop()
	testenv.Must(b, <-done, "persister")
	if cleanupDone != nil {
		if err := <-cleanupDone; err != nil && runCtx.Err() == nil {
			b.Fatalf("cleanup pass: %v", err)
		}
	}
	if finishedEarly {
		b.Logf("cleanup deleted every expired row before the drain ended: the end of the drain ran alone; raise benchExpired")
	}
	var fresh int
	testenv.Must(b, pool.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE expires_at > now()`).Scan(&fresh), "count fresh rows")
	if fresh != nFresh {
		b.Fatalf("drain wrote %d rows for %d events", fresh, nFresh)
	}
	return float64(nFresh) / elapsed.Seconds(), n
}

// fillExpired empties tokens and COPYs n rows whose every credential expired
// weeks ago, as a month of traffic leaves them: issued in order, a third
// with a refresh token and a family, in every state, each on a key of its
// own (fresh events never meet them, so both drains do the same work).
func fillExpired(b *testing.B, pool *pgxpool.Pool, n int) {
	b.Helper()
	ctx := context.Background()
	_, err := pool.Exec(ctx, `TRUNCATE tokens`)
	testenv.Must(b, err, "truncate")
	states := []string{"INACTIVE", "INACTIVE", "EXPIRED", "REVOKED", "ACTIVE"}
	base := time.Now().Add(-60 * 24 * time.Hour)
	step := 25 * 24 * time.Hour / time.Duration(n) // issued over 25 days, ending 35 days ago
	cols := []string{"token_digest", "refresh_digest", "client_id", "subject", "scope", "state", "grant_type",
		"issued_at", "expires_at", "refresh_expires_at", "family_id", "stream_seq", "instance"}
	i := 0
	src := pgx.CopyFromFunc(func() ([]any, error) {
		if i == n {
			return nil, nil
		}
		issued := base.Add(time.Duration(i) * step)
		var refresh, family []byte
		var refreshExpires *time.Time
		if i%3 == 0 {
			refresh, family = random(32), random(16)
			at := issued.Add(720 * time.Hour)
			refreshExpires = &at
		}
		row := []any{random(32), refresh, "old-client", "old-user-" + strconv.Itoa(i), "read", states[i%len(states)],
			"authorization_code", issued, issued.Add(time.Hour), refreshExpires, family, int64(i + 1), "bench"}
		i++
		return row, nil
	})
	copied, err := pool.CopyFrom(ctx, pgx.Identifier{"tokens"}, cols, src)
	testenv.Must(b, err, "copy expired rows")
	if copied != int64(n) {
		b.Fatalf("copied %d expired rows, want %d", copied, n)
	}
	// The same settled start for both drains: statistics, visibility map,
	// and no checkpoint of the fill landing in the measurement.
	for _, sql := range []string{`VACUUM ANALYZE tokens`, `CHECKPOINT`} {
		_, err := pool.Exec(ctx, sql)
		testenv.Must(b, err, sql)
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
