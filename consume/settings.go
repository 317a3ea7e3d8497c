// Package consume holds the settings every batch-consuming role (persister,
// recovery) is configured with. The worker pool itself is internal/stream;
// these settings also carry the store's retry policy, which the pool must
// not know about.
package consume

import (
	"time"

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
