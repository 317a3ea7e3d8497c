// Package persister writes TokenIssued events from JetStream to Postgres in
// batches, one set-based statement per batch, and acknowledges each event only
// after the transaction that holds its row has committed.
package persister

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// Config tunes a persister process.
type Config = consume.Settings

// Persister is one process's pool of batch writers.
type Persister struct {
	cfg     Config
	db      Beginner
	js      jetstream.JetStream
	log     *slog.Logger
	metrics *Metrics
}

// New returns a persister; Run starts it.
func New(cfg Config, db Beginner, js jetstream.JetStream, log *slog.Logger, m *Metrics) *Persister {
	return &Persister{cfg: cfg, db: db, js: js, log: log, metrics: m}
}

// Run consumes until ctx is cancelled, then finishes the batches in hand.
func (p *Persister) Run(ctx context.Context) error {
	cons, err := p.js.Consumer(ctx, p.cfg.Topology.Stream, p.cfg.Topology.Persister)
	if err != nil {
		return fmt.Errorf("persister: open consumer %s: %w", p.cfg.Topology.Persister, err)
	}
	p.log.Info("persister started", "workers", p.cfg.Pool.Workers, "batch_size", p.cfg.Pool.BatchSize, "consumer", p.cfg.Topology.Persister)
	err = p.cfg.NewPool(cons, p.js, p.log, p.HandleBatch, p.metrics.SettleFailures, p.metrics.DeadLettered).Run(ctx)
	p.log.Info("persister stopped")
	return err
}

// pending is one distinct token in a batch and every message that carried it
// (indices into the batch).
type pending struct {
	row  Row
	msgs []int
}

// HandleBatch decodes a batch, writes it and returns each message's verdict:
// poison is dead-lettered, committed rows acked, the rest handed back.
func (p *Persister) HandleBatch(ctx context.Context, msgs []jetstream.Msg) []stream.Verdict {
	verdicts := make([]stream.Verdict, len(msgs))
	var batch []*pending
	byDigest := map[events.Digest]*pending{}
	for i, m := range msgs {
		meta, err := m.Metadata()
		if err != nil {
			verdicts[i] = stream.DeadLetter("no JetStream metadata: " + err.Error())
			continue
		}
		if meta.NumDelivered > 1 {
			p.metrics.Redeliveries.Inc()
		}
		ev, err := events.DecodeTokenIssued(m.Data())
		if err != nil {
			verdicts[i] = stream.DeadLetter(err.Error())
			continue
		}
		// The same token twice in one batch (a replayed copy): one row, the
		// earliest sequence, every message settled with it.
		if pd, ok := byDigest[ev.TokenDigest]; ok {
			pd.msgs = append(pd.msgs, i)
			pd.row.Seq = min(pd.row.Seq, meta.Sequence.Stream)
			continue
		}
		pd := &pending{row: Row{Event: ev, Seq: meta.Sequence.Stream}, msgs: []int{i}}
		byDigest[ev.TokenDigest] = pd
		batch = append(batch, pd)
	}
	if len(batch) > 0 {
		p.write(ctx, msgs, batch, verdicts)
	}
	return verdicts
}

// give sets the verdict of every message of pd.
func give(verdicts []stream.Verdict, pd *pending, v stream.Verdict) {
	for _, i := range pd.msgs {
		verdicts[i] = v
	}
}

// write commits a batch and records its messages' verdicts. A batch that
// fails for a reason retrying cannot fix is split in halves until the
// offending row is alone; that row is dead-lettered and the rest commit.
func (p *Persister) write(ctx context.Context, msgs []jetstream.Msg, batch []*pending, verdicts []stream.Verdict) {
	rows := make([]Row, len(batch))
	for i, pd := range batch {
		rows[i] = pd.row
	}
	start := time.Now()
	outcomes, err := store.Retry(ctx, p.cfg.Retry, func(ctx context.Context) ([]Outcome, error) {
		return WriteBatch(ctx, p.db, rows)
	}, func(reason string, err error, wait time.Duration) {
		p.metrics.Retries.WithLabelValues(reason).Inc()
		p.log.Warn("batch write failed; retrying", "reason", reason, "err", err, "rows", len(rows), "retry_in", wait)
	})
	switch {
	case err == nil:
	case store.IsDataError(err) && ctx.Err() == nil && len(batch) > 1:
		p.log.Warn("batch rejected; splitting to isolate the bad row", "err", err, "rows", len(batch))
		p.write(ctx, msgs, batch[:len(batch)/2], verdicts)
		p.write(ctx, msgs, batch[len(batch)/2:], verdicts)
		return
	case store.IsDataError(err) && ctx.Err() == nil:
		give(verdicts, batch[0], stream.DeadLetter("rejected by Postgres: "+err.Error()))
		return
	default:
		// Out of retries, shutting down, or an operational fault (such as a
		// missing table): hand the batch back to JetStream for later; nothing
		// was committed, nothing is lost.
		p.log.Error("batch not written; returning it for redelivery", "err", err, "rows", len(rows), "redeliver_in", p.cfg.NakDelay)
		for _, pd := range batch {
			give(verdicts, pd, stream.Nak(p.cfg.NakDelay))
		}
		return
	}
	p.metrics.CommitSeconds.Observe(time.Since(start).Seconds())
	p.metrics.Batches.Inc()
	p.metrics.BatchSize.Observe(float64(len(rows)))

	var conflicts []*pending
	for i, pd := range batch {
		switch outcomes[i] {
		case Inserted:
			p.metrics.Rows.Inc()
		case Existing:
			p.metrics.Duplicates.Inc()
		case Conflict:
			conflicts = append(conflicts, pd)
			continue
		}
		give(verdicts, pd, stream.Ack())
	}
	if len(conflicts) > 0 {
		p.forwardConflicts(ctx, msgs, conflicts, verdicts)
	}
}

// forwardConflicts hands events that met an older ACTIVE row to recovery; they
// are acked once JetStream holds the copy. A failed copy is nak'd: the next
// delivery meets the same conflict and tries again.
func (p *Persister) forwardConflicts(ctx context.Context, msgs []jetstream.Msg, conflicts []*pending, verdicts []stream.Verdict) {
	futures := make([]jetstream.PubAckFuture, len(conflicts))
	for i, pd := range conflicts {
		msg := nats.NewMsg(p.cfg.Topology.ConflictSubject())
		msg.Data = msgs[pd.msgs[0]].Data()
		msg.Header.Set(events.HeaderOriginSeq, strconv.FormatUint(pd.row.Seq, 10))
		f, err := p.js.PublishMsgAsync(msg,
			jetstream.WithMsgID("conflict-"+pd.row.Event.TokenDigest.String()),
			jetstream.WithExpectStream(p.cfg.Topology.Stream))
		if err != nil {
			p.log.Warn("forward conflict failed", "err", err, "token_digest", pd.row.Event.TokenDigest.String())
		}
		futures[i] = f
	}
	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for i, pd := range conflicts {
		ok := false
		if futures[i] != nil {
			select {
			case <-futures[i].Ok():
				ok = true
			case err := <-futures[i].Err():
				p.log.Warn("forward conflict failed", "err", err, "token_digest", pd.row.Event.TokenDigest.String())
			case <-waitCtx.Done():
			}
		}
		if ok {
			give(verdicts, pd, stream.Ack())
			p.metrics.ConflictsForwarded.Inc()
		} else {
			give(verdicts, pd, stream.Nak(p.cfg.NakDelay))
		}
	}
}
