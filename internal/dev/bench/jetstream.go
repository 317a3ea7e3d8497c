package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
)

// JetStreamCeiling publishes evs asynchronously (bounded in flight) and then
// consumes them with Fetch and individual acks, returning each rate: the raw
// broker cost of the same events the pipeline carries.
func JetStreamCeiling(ctx context.Context, js jetstream.JetStream, topo events.Topology, evs []*events.TokenIssued) (publish, consume float64, err error) {
	start := time.Now()
	if err := Fill(ctx, js, topo, evs, nil); err != nil {
		return 0, 0, err
	}
	publish = float64(len(evs)) / time.Since(start).Seconds()
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	if err != nil {
		return 0, 0, err
	}
	start = time.Now()
	got := 0
	for got < len(evs) {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			return 0, 0, err
		}
		for m := range batch.Messages() {
			if err := m.Ack(); err != nil {
				return 0, 0, fmt.Errorf("ack: %w", err)
			}
			got++
		}
	}
	return publish, float64(got) / time.Since(start).Seconds(), nil
}
