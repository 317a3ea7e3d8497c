package stream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// LagGauges exports a consumer's backlog the way KEDA's nats-jetstream scaler
// reads it: pending (not yet delivered) and ack pending (delivered, not acked).
type LagGauges struct {
	pending    *prometheus.GaugeVec
	ackPending *prometheus.GaugeVec
	oldest     *prometheus.GaugeVec
}

// NewLagGauges registers the gauges.
func NewLagGauges(reg prometheus.Registerer) *LagGauges {
	g := &LagGauges{
		pending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenpipe_consumer_pending_messages",
			Help: "Messages in the stream not yet delivered to the consumer.",
		}, []string{"consumer"}),
		ackPending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenpipe_consumer_ack_pending_messages",
			Help: "Messages delivered to the consumer and not yet acknowledged.",
		}, []string{"consumer"}),
		// The lag in time. After a Postgres failover that lost commits, its
		// recent maximum bounds how long before the last replicated commit
		// a lost row's event can have been published: the replay's safe
		// point (README "Operating: failover").
		oldest: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tokenpipe_consumer_oldest_unacked_age_seconds",
			Help: "Age of the oldest message the consumer has not acknowledged, delivered or not; 0 when none.",
		}, []string{"consumer"}),
	}
	reg.MustRegister(g.pending, g.ackPending, g.oldest)
	return g
}

// Sample reads the consumer's info, and the oldest message it has not
// acknowledged from the stream, every interval until ctx is done.
func (g *LagGauges) Sample(ctx context.Context, log *slog.Logger, stream jetstream.Stream, cons jetstream.Consumer, name string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := g.sample(ctx, stream, cons, name, interval); err != nil && ctx.Err() == nil {
			log.Debug("consumer lag not sampled", "consumer", name, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (g *LagGauges) sample(ctx context.Context, stream jetstream.Stream, cons jetstream.Consumer, name string, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	info, err := cons.Info(ctx)
	if err != nil {
		return fmt.Errorf("consumer info: %w", err)
	}
	g.pending.WithLabelValues(name).Set(float64(info.NumPending))
	g.ackPending.WithLabelValues(name).Set(float64(info.NumAckPending))
	age := 0.0
	if info.NumPending+uint64(info.NumAckPending) > 0 {
		// The first message on the consumer's subject after its ack floor.
		var opts []jetstream.GetMsgOpt
		if info.Config.FilterSubject != "" {
			opts = append(opts, jetstream.WithGetMsgSubject(info.Config.FilterSubject))
		}
		msg, err := stream.GetMsg(ctx, info.AckFloor.Stream+1, opts...)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
		case err != nil:
			return fmt.Errorf("oldest unacknowledged message: %w", err)
		default:
			age = max(time.Since(msg.Time).Seconds(), 0)
		}
	}
	g.oldest.WithLabelValues(name).Set(age)
	return nil
}
