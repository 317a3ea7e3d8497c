package replay

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// DB is what writing needs: a pool or a connection. Both persister.WriteBatch
// and recovery.Apply take it.
type DB = store.Beginner

// Item is one decoded TokenIssued event with the stream sequence it was
// ORIGINALLY given on the issued subject. Ordering between tokens of a key
// depends on that sequence alone, so a replay must never substitute the
// sequence of a copy (a conflict or dead letter).
type Item = store.Row

// Rejected is an item Postgres refused for its data (a data exception or a
// constraint other than the one-ACTIVE rule): retrying cannot help.
type Rejected struct {
	Item
	Err error
}

// Result counts what one Write did.
type Result struct {
	Inserted    int // rows written by the persister's path
	Present     int // a row with the digest was already there
	Resolved    int // conflicting rows given a row by recovery's rule
	Deactivated int // older ACTIVE rows made INACTIVE by a newer replayed token
	Rejected    []Rejected
}

func (r *Result) add(o Result) {
	r.Inserted += o.Inserted
	r.Present += o.Present
	r.Resolved += o.Resolved
	r.Deactivated += o.Deactivated
	r.Rejected = append(r.Rejected, o.Rejected...)
}

// Writer persists events exactly as the pipeline does: persister.WriteBatch
// first, then recovery.Apply in-process for the rows that met an older ACTIVE
// token, publishing a TokenDeactivated notice for every row recovery turns
// INACTIVE, as the recovery consumer does.
type Writer struct {
	DB       DB
	JS       jetstream.JetStream
	Topology events.Topology
	Retry    store.RetryPolicy
	Log      *slog.Logger
}

// Write persists items, which must have distinct token digests. It returns
// an error only for failures that retrying within the policy did not fix;
// rows Postgres refused for their data are reported in Result.Rejected and
// the rest are still written.
func (w *Writer) Write(ctx context.Context, items []Item) (Result, error) {
	if len(items) == 0 {
		return Result{}, nil
	}
	outcomes, err := store.Retry(ctx, w.Retry, func(ctx context.Context) ([]store.Outcome, error) {
		return store.WriteBatch(ctx, w.DB, items)
	}, w.onRetry("write batch", len(items)))
	if err != nil {
		return w.splitOnDataError(ctx, items, err, w.Write)
	}
	var res Result
	var conflicts []Item
	for i, o := range outcomes {
		switch o {
		case store.Inserted:
			res.Inserted++
		case store.Existing:
			res.Present++
		case store.Conflict:
			conflicts = append(conflicts, items[i])
		}
	}
	if len(conflicts) > 0 {
		r, err := w.resolve(ctx, conflicts)
		res.add(r)
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// resolve runs recovery's rule on conflicting items in one transaction.
func (w *Writer) resolve(ctx context.Context, items []Item) (Result, error) {
	d, err := store.Retry(ctx, w.Retry, func(ctx context.Context) (recovery.Decision, error) {
		return recovery.Apply(ctx, w.DB, items, func(s []recovery.Superseded) error {
			return recovery.PublishDeactivations(ctx, w.JS, w.Topology, s)
		})
	}, w.onRetry("resolve conflicts", len(items)))
	if err != nil {
		return w.splitOnDataError(ctx, items, err, w.resolve)
	}
	// Apply skips digests that got a row meanwhile (the live recovery
	// consumer, or a concurrent batch): those are already present.
	return Result{
		Resolved:    len(d.Insert),
		Present:     len(items) - len(d.Insert),
		Deactivated: len(d.Deactivate),
	}, nil
}

// splitOnDataError isolates the row Postgres refuses, as the persister does:
// halves are retried until the offending row is alone, so one bad row never
// holds back the others. Any other error is returned.
func (w *Writer) splitOnDataError(ctx context.Context, items []Item, err error, again func(context.Context, []Item) (Result, error)) (Result, error) {
	if !store.IsDataError(err) || ctx.Err() != nil {
		return Result{}, fmt.Errorf("write %d events: %w", len(items), err)
	}
	if len(items) == 1 {
		return Result{Rejected: []Rejected{{Item: items[0], Err: err}}}, nil
	}
	var res Result
	for _, half := range [][]Item{items[:len(items)/2], items[len(items)/2:]} {
		r, err := again(ctx, half)
		res.add(r)
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

func (w *Writer) onRetry(what string, n int) func(string, error, time.Duration) {
	return func(reason string, err error, wait time.Duration) {
		if w.Log != nil {
			w.Log.Warn(what+" failed; retrying", "reason", reason, "err", err, "rows", n, "retry_in", wait)
		}
	}
}

// Existing returns which of the digests already have a row. It reads only,
// for dry runs.
func Existing(ctx context.Context, db DB, digests []events.Digest) (map[events.Digest]bool, error) {
	return store.LookupDigests(ctx, db, digests)
}
