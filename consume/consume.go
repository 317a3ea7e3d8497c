// Package consume runs pools of workers that pull batches of messages from a
// durable JetStream consumer and hand each batch to a handler. Persister and
// recovery share it; they differ only in what they do with a batch.
package consume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Handler processes one batch. It must settle every message (ack, nak or
// term) before it returns; the pool does not ack on its behalf. ctx is not
// cancelled by a graceful stop, so a batch already fetched is finished.
type Handler func(ctx context.Context, msgs []jetstream.Msg)

// Config sizes a pool.
type Config struct {
	Workers   int           // concurrent batches per process
	BatchSize int           // most messages per batch
	BatchWait time.Duration // pause before asking again when the queue was empty
}

// Run fetches and handles batches on cfg.Workers goroutines until ctx is
// cancelled. Then each worker finishes the batch it holds and returns; no pull
// request is left open at the server, so nothing waits for an ack timeout.
// finish bounds that last batch: work past it sees a cancelled context.
func Run(ctx context.Context, log *slog.Logger, cons jetstream.Consumer, cfg Config, finish time.Duration, h Handler) error {
	if cfg.Workers < 1 || cfg.BatchSize < 1 || cfg.BatchWait <= 0 {
		return fmt.Errorf("consume: invalid config %+v", cfg)
	}
	// work outlives ctx by at most finish, so a drain completes its batch.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	stopAfter := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(finish, cancelWork)
		<-work.Done()
		t.Stop()
	})
	defer stopAfter()

	var wg sync.WaitGroup
	for i := range cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			worker(ctx, work, log.With("worker", i), cons, cfg, h)
		}()
	}
	wg.Wait()
	return nil
}

func worker(ctx, work context.Context, log *slog.Logger, cons jetstream.Consumer, cfg Config, h Handler) {
	failures := 0
	for ctx.Err() == nil {
		msgs, err := fetch(cons, cfg)
		if err != nil {
			failures++
			delay := min(time.Duration(failures)*200*time.Millisecond, 5*time.Second)
			if failures == 1 || failures%25 == 0 {
				log.Warn("fetch failed; retrying", "err", err, "retry_in", delay, "failures", failures)
			}
			select {
			case <-ctx.Done():
			case <-time.After(delay):
			}
			continue
		}
		failures = 0
		if len(msgs) == 0 {
			select {
			case <-ctx.Done():
			case <-time.After(cfg.BatchWait):
			}
			continue
		}
		h(work, msgs)
	}
}

// fetch takes what is available now, up to BatchSize, without waiting. The
// server answers a no-wait pull at once and ends it, so no request of ours is
// left open at the server (a stopped worker leaves nothing to redeliver after
// an ack timeout), and batching needs no server-side expiry: under load,
// messages pile up while the previous batch commits and the next fetch takes
// them all. (A short FetchMaxWait relies on the server's expiry notice; when
// that comes late the client waits a further second, which showed as a
// one-second p99 lag.)
func fetch(cons jetstream.Consumer, cfg Config) ([]jetstream.Msg, error) {
	batch, err := cons.FetchNoWait(cfg.BatchSize)
	if err != nil {
		return nil, err
	}
	msgs := make([]jetstream.Msg, 0, cfg.BatchSize)
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, jetstream.ErrNoMessages) && len(msgs) == 0 {
		return nil, err
	}
	return msgs, nil
}

// KeepInProgress tells JetStream every interval that msgs are still being
// worked on, so a batch in a long retry is not redelivered to another worker
// meanwhile. Call the returned stop function when the batch is settled.
func KeepInProgress(msgs []jetstream.Msg, interval time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				for _, m := range msgs {
					_ = m.InProgress()
				}
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}
