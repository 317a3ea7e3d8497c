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

	"github.com/nats-io/nats.go/jetstream"
)

// Handler processes one batch and returns a verdict for each message, in the
// order of msgs; the pool settles them. A handler must not settle messages
// itself. ctx is not cancelled by a graceful stop, so a batch already
// fetched is finished.
type Handler func(ctx context.Context, msgs []jetstream.Msg) []Verdict

// Config sizes a pool.
type Config struct {
	Workers   int // concurrent batches per process
	BatchSize int // most messages per batch
	// BatchWait is how long a batch gathers after the queue was found
	// empty, and the least time between the pool's batches while they are
	// not full (whichever workers take them): it bounds the latency added
	// at low load and keeps batches (and the cost per row) from shrinking
	// to what arrives during one commit, or to a share of that per worker.
	BatchWait time.Duration
	// IdleWait is how long an idle pool's pull request waits at the server
	// before it is renewed; 0 means DefaultIdleWait.
	IdleWait time.Duration
}

// DefaultIdleWait is the life of an idle pool's pull request. An idle pool
// costs one pull request and one heartbeat per IdleWait instead of a poll
// every BatchWait (its other workers wait for their turn, not at the
// server); a stop does not wait for it (see await).
const DefaultIdleWait = 5 * time.Second

// drainWait bounds how long a stopping worker waits for its idle pull
// request to be withdrawn (one round trip to the server when it is up).
const drainWait = 5 * time.Second

// answerWait bounds a worker's wait for the answer to a no-wait pull
// request. An answer later than that is not lost: it arrives in the pool's
// inbox and the next fetch, whichever worker makes it, takes it.
const answerWait = 5 * time.Second

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

	// gate is held by the one worker taking a batch (see take). Its holder
	// alone uses puller, the pool's pull requests and their inbox, and next,
	// when the next batch may be taken.
	gate   chan struct{}
	puller *puller
	next   time.Time
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
	p.gate = make(chan struct{}, 1)
	if p.puller = p.openPuller(ctx); p.puller == nil {
		return nil // stopped before the connection allowed one
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
	// Whatever the server sent the pool before the inbox closed (a late
	// answer to the last fetch) is handled, not left to wait for the ack
	// timeout.
	if late := p.puller.drain(drainWait); len(late) > 0 {
		p.handle(work, late)
	}
	return nil
}

// openPuller opens the pool's pull inbox, retrying until ctx ends (then it
// returns nil): only a closed connection fails here, and the pool keeps
// trying as it does for a failed fetch.
func (p *Pool) openPuller(ctx context.Context) *puller {
	for {
		pl, err := newPuller(p.Settler.JS, p.Consumer)
		if err == nil {
			return pl
		}
		p.Log.Warn("open the pool's pull inbox; retrying", "err", err)
		sleep(ctx, time.Second)
		if ctx.Err() != nil {
			return nil
		}
	}
}

func (p *Pool) worker(ctx, work context.Context, log *slog.Logger) {
	failures := 0
	for ctx.Err() == nil {
		msgs, err := p.take(ctx, log)
		if err != nil && len(msgs) > 0 {
			// Delivered to this worker: handled now, the error met again
			// on the next fetch.
			log.Warn("fetch failed after taking messages", "err", err, "messages", len(msgs))
			err = nil
		}
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
			continue
		}
		p.handle(work, msgs)
	}
}

// take returns this worker's next batch. Workers take batches one at a
// time, holding the gate while they wait, fetch or wait at the server, so
// the pool, not each worker, sets the pace: after a batch that was not full
// the next is taken BatchWait later, whichever worker takes it, and after a
// full one (a backlog) at once. Fetching again at once after a batch that was
// not full would take only what arrived during its commit, and workers that
// each kept their own pace would split the same arrivals into a batch each:
// at a steady rate both made batches smaller, each paying the whole
// per-batch cost (transaction, fence, probes, commit, a wake-up of every
// process on the way). Only the gate's holder waits at the server when the
// queue is empty. The pool's requests share one inbox, so the late answer to
// one worker's fetch (a stall longer than answerWait) is taken by the next
// fetch, whichever worker makes it, within one turn of the gate. Messages it
// returns must be handled, also after ctx ends.
func (p *Pool) take(ctx context.Context, log *slog.Logger) ([]jetstream.Msg, error) {
	select {
	case p.gate <- struct{}{}:
	case <-ctx.Done():
		return nil, nil
	}
	defer func() { <-p.gate }()
	sleep(ctx, time.Until(p.next))
	if ctx.Err() != nil {
		return nil, nil
	}
	msgs, err := p.puller.fetch(ctx, p.Config.BatchSize)
	if err == nil && len(msgs) == 0 {
		msgs, err = p.awaitBatch(ctx, log)
	}
	p.next = time.Time{}
	if len(msgs) < p.Config.BatchSize {
		p.next = time.Now().Add(p.Config.BatchWait)
	}
	return msgs, err
}

// awaitBatch is what a worker does when the queue was empty: it waits at the
// server for the next message (see await), then lets the batch gather for
// BatchWait and takes the rest of it without waiting. Messages it returns
// must be handled, also after ctx ends: they are delivered to this worker.
func (p *Pool) awaitBatch(ctx context.Context, log *slog.Logger) ([]jetstream.Msg, error) {
	msgs, err := p.await(ctx, log)
	if err != nil || len(msgs) == 0 || len(msgs) >= p.Config.BatchSize {
		return msgs, err
	}
	sleep(ctx, p.Config.BatchWait)
	if ctx.Err() != nil {
		return msgs, nil // stopping: no new pull request
	}
	more, err := p.puller.fetch(ctx, p.Config.BatchSize-len(msgs))
	if err != nil {
		// The messages held are handled; the next fetch meets the error again.
		log.Warn("fetch after idle failed", "err", err)
	}
	return append(msgs, more...), nil
}

// await waits until the consumer has a message for this worker, holding one
// pull request for a single message at the server (renewed every IdleWait),
// so an idle worker costs the server and itself next to nothing. A stop
// withdraws the request: Drain unsubscribes and then flushes, so a message
// the server delivered before it saw the unsubscribe still arrives and is
// returned, and the server drops a request nobody listens to. Nothing is
// left delivered-but-unread to wait for the ack timeout, and no request
// stays open.
func (p *Pool) await(ctx context.Context, log *slog.Logger) ([]jetstream.Msg, error) {
	wait := p.Config.IdleWait
	if wait <= 0 {
		wait = DefaultIdleWait
	}
	it, err := p.Consumer.Messages(jetstream.PullMaxMessages(1), jetstream.PullExpiry(wait))
	if err != nil {
		return nil, fmt.Errorf("idle pull: %w", err)
	}
	var msgs []jetstream.Msg
	// Bounded by wait: then the pool fetches again, which also takes
	// anything its inbox received late while this worker waited here.
	waitCtx, cancel := context.WithTimeout(ctx, wait)
	first, waitErr := it.Next(jetstream.NextContext(waitCtx))
	quiet := waitCtx.Err() != nil && ctx.Err() == nil
	cancel()
	if waitErr == nil {
		msgs = append(msgs, first)
	}
	it.Drain()
	for {
		m, err := it.Next(jetstream.NextMaxWait(drainWait))
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			break
		}
		if err != nil {
			// The server did not confirm the unsubscribe: a message it may
			// still deliver is redelivered after the ack wait.
			log.Warn("idle pull request not withdrawn", "err", err)
			it.Stop()
			break
		}
		msgs = append(msgs, m)
	}
	if len(msgs) == 0 && waitErr != nil && ctx.Err() == nil && !quiet {
		return nil, fmt.Errorf("idle pull: %w", waitErr)
	}
	return msgs, nil
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
