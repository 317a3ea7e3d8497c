// Package consume holds the settings every batch-consuming role (persister,
// recovery) is configured with. The worker pool itself is internal/stream;
// these settings also carry the store's retry policy, which the pool must
// not know about.
package consume

import (
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// Config sizes a pool.
type Config = stream.Config

// Settings are what every batch-consuming role (persister, recovery) needs.
type Settings struct {
	Pool     Config
	Retry    store.RetryPolicy
	Topology events.Topology
	// Finish bounds the last batch after a graceful stop begins.
	Finish time.Duration
	// NakDelay is how long JetStream waits before redelivering a batch that
	// could not be settled.
	NakDelay time.Duration
}

// NewPool returns the worker pool of a role with these settings: batches
// stay in progress for a third of the ack wait at a time, and poison and
// failed acknowledgements are counted in the role's series.
func (s Settings) NewPool(cons jetstream.Consumer, js jetstream.JetStream, log *slog.Logger, h stream.Handler,
	settleFailures *prometheus.CounterVec, deadLettered prometheus.Counter) *stream.Pool {
	return &stream.Pool{
		Consumer: cons, Config: s.Pool, Finish: s.Finish,
		InProgressEvery: s.Topology.AckWait / 3,
		Handler:         h,
		Settler: &stream.Settler{
			JS: js, Topology: s.Topology, NakDelay: s.NakDelay, Log: log,
			Failures: settleFailures, DeadLettered: deadLettered,
		},
		Log: log,
	}
}
