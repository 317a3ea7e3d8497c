package replay_test

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/persister"
)

// BenchmarkReplayVsDrain compares a replay of the whole stream into an empty
// table with the persister pool draining the same stream into the same
// empty table (2 workers, batches of 1000 each, as deployed), and reports
// both rates, their ratio (target: at least 0.8), and the rate of a replay
// over rows that are all present already. Run it with
//
//	go test -run '^$' -bench ReplayVsDrain -benchtime 1x ./replay/
//
// TOKENPIPE_BENCH_REPLAY_EVENTS sets the events (default 200000).
func BenchmarkReplayVsDrain(b *testing.B) {
	n := 200000
	if s := os.Getenv("TOKENPIPE_BENCH_REPLAY_EVENTS"); s != "" {
		v, err := strconv.Atoi(s)
		testenv.Must(b, err, "TOKENPIPE_BENCH_REPLAY_EVENTS")
		n = v
	}
	_, pool := testenv.Database(b)
	_, js, topo := testenv.JetStream(b)
	ctx := context.Background()
	testenv.Must(b, bench.Fill(ctx, js, topo, bench.MakeEvents(n), nil), "fill")
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(b, err, "stream")
	w := &replay.Writer{DB: pool, JS: js, Topology: topo, Retry: store.DefaultRetryPolicy()}

	var drainRate, replayRate, presentRate float64
	for b.Loop() {
		truncate(b, pool)
		drainRate = drain(b, pool, js, stream, topo, n)

		truncate(b, pool)
		start := time.Now()
		sum, err := replay.Run(ctx, w, replay.Options{Workers: 2, BatchSize: 1000})
		testenv.Must(b, err, "replay")
		replayRate = float64(n) / time.Since(start).Seconds()
		if sum.Inserted+sum.Resolved != int64(n) {
			b.Fatalf("replay wrote %d rows for %d events", sum.Inserted+sum.Resolved, n)
		}

		start = time.Now()
		sum, err = replay.Run(ctx, w, replay.Options{Workers: 2, BatchSize: 1000})
		testenv.Must(b, err, "replay over present rows")
		presentRate = float64(n) / time.Since(start).Seconds()
		if sum.Present != int64(n) {
			b.Fatalf("second replay found %d of %d present", sum.Present, n)
		}
	}
	b.ReportMetric(drainRate, "drain_events/s")
	b.ReportMetric(replayRate, "replay_events/s")
	b.ReportMetric(replayRate/drainRate, "replay/drain")
	b.ReportMetric(presentRate, "replay_present_events/s")
}

func truncate(b *testing.B, pool *pgxpool.Pool) {
	b.Helper()
	_, err := pool.Exec(context.Background(), "TRUNCATE tokens")
	testenv.Must(b, err, "truncate")
}

// drain times a persister pool from the start of the stream until every
// event is acknowledged (acked means committed), as bench.Drain does.
func drain(b *testing.B, pool *pgxpool.Pool, js jetstream.JetStream, stream jetstream.Stream, topo events.Topology, n int) float64 {
	b.Helper()
	ctx := context.Background()
	_ = stream.DeleteConsumer(ctx, topo.Persister)
	_, err := stream.CreateOrUpdateConsumer(ctx, topo.PersisterConsumerConfig())
	testenv.Must(b, err, "recreate persister consumer")
	runCtx, cancel := context.WithCancel(ctx)
	p := persister.New(persister.Config{
		Pool:  consume.Config{Workers: 2, BatchSize: 1000, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: topo, Finish: 10 * time.Second, NakDelay: time.Second,
	}, pool, js, testenv.Logger(b), persister.NewMetrics(prometheus.NewRegistry()))
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- p.Run(runCtx) }()
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(b, err, "consumer")
	for {
		info, err := cons.Info(ctx)
		testenv.Must(b, err, "consumer info")
		if info.NumPending == 0 && info.NumAckPending == 0 && info.Delivered.Stream > 0 {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	elapsed := time.Since(start)
	cancel()
	testenv.Must(b, <-done, "persister")
	var rows int
	testenv.Must(b, pool.QueryRow(ctx, "SELECT count(*) FROM tokens").Scan(&rows), "count")
	if rows != n {
		b.Fatalf("drain wrote %d rows for %d events", rows, n)
	}
	return float64(n) / elapsed.Seconds()
}
