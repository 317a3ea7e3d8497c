// Package bench measures tokenpipe's stages against ceilings measured in the
// same run on the same machine: raw COPY into the same table for the
// persister, raw publish for the issuer's stream.
package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/stream"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// DrainOptions configures one drain benchmark.
type DrainOptions struct {
	Events    int           // events pre-filled into the stream
	Workers   int           // persister workers and COPY writers
	BatchSize int           // events per batch and rows per COPY
	BatchWait time.Duration // persister batch wait
	Runs      int           // paired runs (COPY, drain) to take medians over
	Topology  events.Topology
	Progress  io.Writer // progress lines; nil for none
	Log       *slog.Logger
}

// DrainRun is one paired measurement.
type DrainRun struct {
	CopyRowsPerSec  float64
	DrainRowsPerSec float64
}

// Ratio is drain over COPY.
func (r DrainRun) Ratio() float64 { return r.DrainRowsPerSec / r.CopyRowsPerSec }

// DrainResult holds every run.
type DrainResult struct {
	Options DrainOptions
	Runs    []DrainRun
}

// Stat is a median with its range.
type Stat struct{ Min, Median, Max float64 }

func stat(xs []float64) Stat {
	s := slices.Clone(xs)
	slices.Sort(s)
	return Stat{Min: s[0], Median: s[len(s)/2], Max: s[len(s)-1]}
}

// Copy, Drain and Ratio summarise the runs.
func (r DrainResult) Copy() Stat {
	return stat(collect(r.Runs, func(d DrainRun) float64 { return d.CopyRowsPerSec }))
}
func (r DrainResult) Drain() Stat {
	return stat(collect(r.Runs, func(d DrainRun) float64 { return d.DrainRowsPerSec }))
}
func (r DrainResult) Ratio() Stat { return stat(collect(r.Runs, DrainRun.Ratio)) }

func collect(runs []DrainRun, f func(DrainRun) float64) []float64 {
	out := make([]float64, len(runs))
	for i, r := range runs {
		out[i] = f(r)
	}
	return out
}

// Drain pre-fills the stream once, then for each run truncates the table,
// COPYs the same rows in (the ceiling), truncates again and lets a persister
// drain the stream from the start. The caller owns the database and stream.
func Drain(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, o DrainOptions) (*DrainResult, error) {
	stream, err := events.Provision(ctx, js, o.Topology)
	if err != nil {
		return nil, err
	}
	evs := MakeEvents(o.Events)
	progress(o.Progress, "pre-filling stream %s with %d events", o.Topology.Stream, o.Events)
	if err := Fill(ctx, js, o.Topology, evs, o.Progress); err != nil {
		return nil, err
	}
	res := &DrainResult{Options: o}
	for run := 1; run <= o.Runs; run++ {
		if err := truncate(ctx, pool); err != nil {
			return nil, err
		}
		copyRate, err := CopyCeiling(ctx, pool, evs, o.Workers, o.BatchSize)
		if err != nil {
			return nil, err
		}
		if err := truncate(ctx, pool); err != nil {
			return nil, err
		}
		drainRate, err := drainOnce(ctx, pool, js, stream, o)
		if err != nil {
			return nil, err
		}
		r := DrainRun{CopyRowsPerSec: copyRate, DrainRowsPerSec: drainRate}
		res.Runs = append(res.Runs, r)
		progress(o.Progress, "run %d/%d: COPY %.0f rows/s, persister %.0f rows/s, ratio %.2f", run, o.Runs, copyRate, drainRate, r.Ratio())
	}
	return res, nil
}

// MakeEvents returns n token events over n distinct keys, as an issuer would
// publish them for n different users.
func MakeEvents(n int) []*events.TokenIssued {
	now := time.Now().UTC().Truncate(time.Microsecond)
	out := make([]*events.TokenIssued, n)
	for i := range out {
		var d events.Digest
		var f tokens.Family
		_, _ = rand.Read(d[:])
		_, _ = rand.Read(f[:]) // issued tokens all carry a family, indexed
		out[i] = &events.TokenIssued{
			Version: events.Version, Type: events.TypeTokenIssued, TokenDigest: d,
			ClientID: "bench-client", Subject: "user-" + strconv.Itoa(i), Scopes: []string{"read"},
			GrantType: "client_credentials", IssuedAt: now, ExpiresAt: now.Add(time.Hour), Instance: "bench",
			FamilyID: &f,
		}
	}
	return out
}

// Fill publishes evs with bounded asynchronous publishing and waits for
// every acknowledgement.
//
// The window stays well under the client's limit of pending acks (4000 by
// default): a publish past that limit waits only the stall wait (200 ms by
// default) for a slot and then fails, which on a busy machine, where acks
// come late, it did. The long stall wait covers callers sharing js.
func Fill(ctx context.Context, js jetstream.JetStream, topo events.Topology, evs []*events.TokenIssued, w io.Writer) error {
	const window = 2000
	futures := make([]jetstream.PubAckFuture, 0, window)
	wait := func() error {
		if err := stream.WaitAcks(ctx, futures); err != nil {
			return err
		}
		futures = futures[:0]
		return nil
	}
	last := time.Now()
	for i, ev := range evs {
		body, err := events.EncodeTokenIssued(ev)
		if err != nil {
			return err
		}
		f, err := js.PublishAsync(topo.IssuedSubjectOf(ev.ClientID, ev.Subject, ev.Scope()), body, jetstream.WithMsgID(ev.TokenDigest.String()),
			jetstream.WithStallWait(time.Minute))
		if err != nil {
			return fmt.Errorf("publish: %w", err)
		}
		futures = append(futures, f)
		if len(futures) == window {
			if err := wait(); err != nil {
				return err
			}
		}
		if time.Since(last) > 2*time.Second {
			progress(w, "  published %d/%d", i+1, len(evs))
			last = time.Now()
		}
	}
	return wait()
}

var copyColumns = []string{"token_digest", "refresh_digest", "client_id", "subject", "scope", "state",
	"grant_type", "issued_at", "expires_at", "stream_seq", "instance", "family_id"}

// CopyCeiling COPYs evs into tokens with the given number of writers, each
// COPY one transaction of batch rows, and returns rows per second.
func CopyCeiling(ctx context.Context, pool *pgxpool.Pool, evs []*events.TokenIssued, writers, batch int) (float64, error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	start := time.Now()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				lo := int(next.Add(int64(batch))) - batch
				if lo >= len(evs) {
					return
				}
				chunk := evs[lo:min(lo+batch, len(evs))]
				rows := make([][]any, len(chunk))
				for i, e := range chunk {
					rows[i] = []any{e.TokenDigest[:], nil, e.ClientID, e.Subject, e.Scope(), "ACTIVE",
						e.GrantType, e.IssuedAt, e.ExpiresAt, int64(lo + i + 1), e.Instance, e.FamilyID[:]}
				}
				if _, err := pool.CopyFrom(ctx, pgx.Identifier{"tokens"}, copyColumns, pgx.CopyFromRows(rows)); err != nil {
					errs <- fmt.Errorf("copy: %w", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(len(evs)) / time.Since(start).Seconds(), nil
}

// drainOnce recreates the persister's consumer at the start of the stream and
// times a persister pool until every event has a row.
func drainOnce(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, stream jetstream.Stream, o DrainOptions) (float64, error) {
	_ = stream.DeleteConsumer(ctx, o.Topology.Persister)
	if _, err := stream.CreateOrUpdateConsumer(ctx, o.Topology.PersisterConsumerConfig()); err != nil {
		return 0, fmt.Errorf("recreate consumer: %w", err)
	}
	settings := consume.Settings{
		Pool:     consume.Config{Workers: o.Workers, BatchSize: o.BatchSize, BatchWait: o.BatchWait},
		Retry:    store.DefaultRetryPolicy(),
		Topology: o.Topology, Finish: 10 * time.Second, NakDelay: time.Second,
	}
	// The persister role's garbage collection setting, in this process for
	// the drain only.
	defer app.TunePersisterGC()()
	start := time.Now()
	running := app.StartPipeline(ctx, pool, js, app.PipelineConfig{Persister: &settings, Log: o.Log})
	// Every return stops the persister and waits for it: none leaves it
	// writing into the next run's table.
	defer func() { _ = running.Stop() }()
	cons, err := js.Consumer(ctx, o.Topology.Stream, o.Topology.Persister)
	if err != nil {
		return 0, err
	}
	// Poll the consumer, not the table: counting rows would load the very
	// database being measured. Every event acked means every row committed.
	last := time.Now()
	for {
		info, err := cons.Info(ctx)
		if err != nil {
			return 0, fmt.Errorf("consumer info: %w", err)
		}
		if info.NumPending == 0 && info.NumAckPending == 0 && info.AckFloor.Stream >= info.Delivered.Stream && info.Delivered.Stream > 0 {
			break
		}
		if time.Since(last) > 2*time.Second {
			progress(o.Progress, "  persisted about %d/%d", info.AckFloor.Consumer, o.Events)
			last = time.Now()
		}
		select {
		case <-running.Stopped():
			return 0, fmt.Errorf("persister stopped early: %v", running.Wait())
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
	elapsed := time.Since(start)
	if err := running.Stop(); err != nil {
		return 0, err
	}
	states, err := store.RowsByState(ctx, pool)
	if err != nil {
		return 0, fmt.Errorf("count rows: %w", err)
	}
	var n int
	for _, c := range states {
		n += int(c)
	}
	if n != o.Events {
		return 0, fmt.Errorf("drain wrote %d rows for %d events", n, o.Events)
	}
	return float64(o.Events) / elapsed.Seconds(), nil
}

func truncate(ctx context.Context, pool *pgxpool.Pool) error {
	// VACUUM is not allowed in a transaction block; TRUNCATE gives a fresh,
	// empty heap and indexes so every run starts from the same state.
	if _, err := pool.Exec(ctx, "TRUNCATE tokens"); err != nil {
		return fmt.Errorf("truncate: %w", err)
	}
	return nil
}

func progress(w io.Writer, format string, a ...any) {
	if w != nil {
		fmt.Fprintf(w, time.Now().Format("15:04:05 ")+format+"\n", a...)
	}
}
