// Package stream runs pools of workers that pull batches of messages from a
// durable JetStream consumer and hand each batch to a handler. Persister and
// recovery share it; they differ only in what they do with a batch.
//
// A handler returns one verdict per message (ack, nak with a delay,
// terminate, dead-letter) and the pool settles the messages: every
// acknowledgement's error is checked, counted and logged in one place, and
// poison goes to the dead-letter subject through one path. The pool knows
// nothing of the database: handlers turn their own errors into verdicts.
package stream

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

// Handler processes one batch and returns a verdict for each message, in the
// order of msgs; the pool settles them. A handler must not settle messages
// itself. ctx is not cancelled by a graceful stop, so a batch already
// fetched is finished.
type Handler func(ctx context.Context, msgs []jetstream.Msg) []Verdict

// Config sizes a pool.
type Config struct {
	Workers   int           // concurrent batches per process
	BatchSize int           // most messages per batch
	BatchWait time.Duration // pause before asking again when the queue was empty
}

// Pool is a consumer's worker pool.
type Pool struct {
	Consumer jetstream.Consumer
	Config   Config
	// Finish bounds the last batch after a graceful stop begins: work past
	// it sees a cancelled context.
	Finish time.Duration
	// InProgressEvery is how often the messages of a batch being handled are
	// reported in progress, so a batch in a long retry is not redelivered to
	// another worker meanwhile (a third of the ack wait suits). 0: never.
	InProgressEvery time.Duration
	Handler         Handler
	Settler         *Settler
	Log             *slog.Logger
}

// Run fetches, handles and settles batches on Config.Workers goroutines
// until ctx is cancelled. Then each worker finishes the batch it holds and
// returns; no pull request is left open at the server, so nothing waits for
// an ack timeout.
func (p *Pool) Run(ctx context.Context) error {
	cfg := p.Config
	if cfg.Workers < 1 || cfg.BatchSize < 1 || cfg.BatchWait <= 0 {
		return fmt.Errorf("stream: invalid pool config %+v", cfg)
	}
	if p.Handler == nil || p.Settler == nil {
		return errors.New("stream: pool needs a handler and a settler")
	}
	// work outlives ctx by at most Finish, so a drain completes its batch.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	stopAfter := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(p.Finish, cancelWork)
		<-work.Done()
		t.Stop()
	})
	defer stopAfter()

	var wg sync.WaitGroup
	for i := range cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.worker(ctx, work, p.Log.With("worker", i))
		}()
	}
	wg.Wait()
	return nil
}

func (p *Pool) worker(ctx, work context.Context, log *slog.Logger) {
	failures := 0
	for ctx.Err() == nil {
		msgs, err := fetch(p.Consumer, p.Config)
		if err != nil {
			failures++
			delay := min(time.Duration(failures)*200*time.Millisecond, 5*time.Second)
			if failures == 1 || failures%25 == 0 {
				log.Warn("fetch failed; retrying", "err", err, "retry_in", delay, "failures", failures)
			}
			sleep(ctx, delay)
			continue
		}
		failures = 0
		if len(msgs) == 0 {
			sleep(ctx, p.Config.BatchWait)
			continue
		}
		p.handle(work, msgs)
	}
}

// handle runs the handler on one batch, keeping its messages in progress
// meanwhile, and settles them.
func (p *Pool) handle(ctx context.Context, msgs []jetstream.Msg) {
	stop := func() {}
	if p.InProgressEvery > 0 {
		stop = p.Settler.keepInProgress(msgs, p.InProgressEvery)
	}
	verdicts := p.Handler(ctx, msgs)
	stop()
	p.Settler.Settle(ctx, msgs, verdicts)
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
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
