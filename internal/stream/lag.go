package stream

import (
	"context"
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
	}
	reg.MustRegister(g.pending, g.ackPending)
	return g
}

// Sample reads the consumer's info every interval until ctx is done.
func (g *LagGauges) Sample(ctx context.Context, log *slog.Logger, cons jetstream.Consumer, name string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		reqCtx, cancel := context.WithTimeout(ctx, interval)
		info, err := cons.Info(reqCtx)
		cancel()
		if err == nil {
			g.pending.WithLabelValues(name).Set(float64(info.NumPending))
			g.ackPending.WithLabelValues(name).Set(float64(info.NumAckPending))
		} else if ctx.Err() == nil {
			log.Debug("consumer info failed", "consumer", name, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
