package stream_test

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/stream"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// The lag gauges follow the persister consumer: a backlog shows as pending
// messages and as the age of its oldest message; once everything is
// acknowledged the age is back to 0.
func TestLagGaugesShowBacklogAndItsAge(t *testing.T) {
	_, js, topo := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.Must(t, bench.Fill(ctx, js, topo, bench.MakeEvents(3), nil), "fill")
	st, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	cons, err := st.Consumer(ctx, topo.Persister)
	testenv.Must(t, err, "consumer")

	reg := prometheus.NewRegistry()
	g := stream.NewLagGauges(reg)
	sampleCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		g.Sample(sampleCtx, testenv.Logger(t), st, cons, topo.Persister, 50*time.Millisecond)
	}()
	defer func() { stop(); <-done }()

	gauge := func(name string) float64 {
		mfs, err := reg.Gather()
		testenv.Must(t, err, "gather")
		for _, mf := range mfs {
			if mf.GetName() == name && len(mf.GetMetric()) == 1 {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		return -1
	}
	testenv.Eventually(t, 10*time.Second, "a second of lag", func() (bool, error) {
		return gauge("tokenpipe_consumer_pending_messages") == 3 && gauge("tokenpipe_consumer_oldest_unacked_age_seconds") >= 1, nil
	})

	batch, err := cons.FetchNoWait(3)
	testenv.Must(t, err, "fetch")
	for m := range batch.Messages() {
		testenv.Must(t, m.DoubleAck(ctx), "ack")
	}
	testenv.Eventually(t, 10*time.Second, "no lag once acknowledged", func() (bool, error) {
		return gauge("tokenpipe_consumer_pending_messages") == 0 && gauge("tokenpipe_consumer_ack_pending_messages") == 0 &&
			gauge("tokenpipe_consumer_oldest_unacked_age_seconds") == 0, nil
	})
}
