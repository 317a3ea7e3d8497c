package persister_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/persister"
)

// TestGracefulStopLeavesNothingInFlight stops a busy persister and checks,
// right away, that every event it had taken was committed and acknowledged:
// none is left for another pod to receive only after the ack timeout.
func TestGracefulStopLeavesNothingInFlight(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	nc, js, topo := testenv.JetStream(t)
	ctx := context.Background()
	// Small batches over a long stream, so the stop always lands mid-stream
	// even on a loaded machine.
	evs := bench.MakeEvents(40000)
	testenv.Must(t, bench.Fill(ctx, js, topo, evs, nil), "fill")

	runCtx, stop := context.WithCancel(ctx)
	p := persister.New(persister.Config{
		Pool:  consume.Config{Workers: 2, BatchSize: 100, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: topo, Finish: 10 * time.Second, NakDelay: time.Second,
	}, pool, js, testenv.Logger(t), persister.NewMetrics(prometheus.NewRegistry()))
	done := make(chan error, 1)
	go func() { done <- p.Run(runCtx) }()
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(t, err, "consumer")
	testenv.Eventually(t, 2*time.Minute, "persister under way", func() (bool, error) {
		info, err := cons.Info(ctx)
		if err != nil {
			return false, err
		}
		return info.AckFloor.Consumer >= 2000, nil
	})
	stop()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("persister did not stop within 15 s of its stop signal")
	}
	testenv.Must(t, nc.Flush(), "flush")
	info, err := cons.Info(ctx)
	testenv.Must(t, err, "consumer info")
	if info.NumAckPending != 0 || info.NumWaiting != 0 {
		t.Fatalf("after stop: %d ack pending, %d pull requests waiting; want 0 and 0", info.NumAckPending, info.NumWaiting)
	}
	var rows uint64
	testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM tokens").Scan(&rows), "count")
	if rows != info.AckFloor.Stream || rows >= uint64(len(evs)) {
		t.Fatalf("rows = %d, acked up to %d of %d: a stop must commit exactly what it acked, mid-stream", rows, info.AckFloor.Stream, len(evs))
	}
}
