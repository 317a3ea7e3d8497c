package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// Layout is one way of binding persisters to the issued subject.
type Layout struct {
	Name       string
	Partitions int // 1: today's shared consumer
	Workers    int // batches in flight on the shared consumer; partitions have one each
}

// Writers is how many batches can be in flight at once.
func (l Layout) Writers() int {
	if l.Partitions > 1 {
		return l.Partitions
	}
	return l.Workers
}

// PartitionsOptions configures the partition benchmark.
type PartitionsOptions struct {
	Events    int // tokens published per run
	Keys      int // distinct keys they are spread over, in random order
	BatchSize int
	Runs      int
	Layouts   []Layout
	Topology  events.Topology // the name and prefix are suffixed per run
	Progress  io.Writer
	Log       *slog.Logger
}

// PartitionsRun is one layout's drain.
type PartitionsRun struct {
	RowsPerSec float64 // every event has its row and every conflict is resolved
	// PersistedPerSec counts until the persisters are done: every event has
	// its row or waits on the conflict subject.
	PersistedPerSec float64
	Conflicts       float64 // events the persisters forwarded to recovery
	Deadlocks       float64 // deadlock retries, persisters and recovery
	Retries         float64 // all other retries (concurrent activation, ...)
}

// PartitionsResult holds every run of every layout, in layout order.
type PartitionsResult struct {
	Options PartitionsOptions
	Runs    [][]PartitionsRun
}

// Median summarises a layout's runs.
func (r PartitionsResult) Median(layout int, f func(PartitionsRun) float64) Stat {
	xs := make([]float64, len(r.Runs[layout]))
	for i, run := range r.Runs[layout] {
		xs[i] = f(run)
	}
	return stat(xs)
}

// Partitions drains the same mix of tokens (Events over Keys, each key
// re-issued Events/Keys times) through every layout, Runs times, layouts
// interleaved within a run so machine noise spreads over all of them. Each
// drain gets an empty table and its own stream, filled before the clock
// starts; persisters and recovery run in this process.
func Partitions(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, o PartitionsOptions) (*PartitionsResult, error) {
	evs, err := reissuedEvents(o.Events, o.Keys)
	if err != nil {
		return nil, err
	}
	res := &PartitionsResult{Options: o, Runs: make([][]PartitionsRun, len(o.Layouts))}
	for run := 1; run <= o.Runs; run++ {
		for i, l := range o.Layouts {
			r, err := partitionDrain(ctx, pool, js, o, l, evs, run)
			if err != nil {
				return nil, fmt.Errorf("%s, run %d: %w", l.Name, run, err)
			}
			res.Runs[i] = append(res.Runs[i], r)
			progress(o.Progress, "run %d/%d %-18s %8.0f rows/s persisted, %8.0f resolved, %6.0f conflicts, %4.0f deadlock retries, %4.0f other retries",
				run, o.Runs, l.Name, r.PersistedPerSec, r.RowsPerSec, r.Conflicts, r.Deadlocks, r.Retries)
		}
	}
	return res, nil
}

// reissuedEvents returns n tokens over keys keys, every key getting its
// share, in random order.
func reissuedEvents(n, keys int) ([]*events.TokenIssued, error) {
	now := time.Now().UTC().Truncate(time.Microsecond)
	out := make([]*events.TokenIssued, n)
	for i := range out {
		var d events.Digest
		var f tokens.Family
		_, _ = rand.Read(d[:])
		_, _ = rand.Read(f[:])
		out[i] = &events.TokenIssued{
			Version: events.Version, Type: events.TypeTokenIssued, TokenDigest: d,
			ClientID: "bench-client", Subject: "user-" + strconv.Itoa(i%keys), Scopes: []string{"read"},
			GrantType: "client_credentials", IssuedAt: now, ExpiresAt: now.Add(time.Hour), Instance: "bench",
			FamilyID: &f,
		}
	}
	for i := len(out) - 1; i > 0; i-- { // Fisher-Yates
		j, err := rand.Int(rand.Reader, big.NewInt(int64(i+1)))
		if err != nil {
			return nil, err
		}
		out[i], out[j.Int64()] = out[j.Int64()], out[i]
	}
	return out, nil
}

// partitionDrain fills a fresh stream laid out as l, then times persisters
// and recovery until nothing is pending, and checks the table.
func partitionDrain(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, o PartitionsOptions,
	l Layout, evs []*events.TokenIssued, run int) (PartitionsRun, error) {
	topo := o.Topology
	suffix := fmt.Sprintf("%s%d", strings.ReplaceAll(strings.ToLower(l.Name), " ", ""), run)
	topo.Stream, topo.Prefix, topo.Partitions = topo.Stream+"_"+strings.ToUpper(suffix), topo.Prefix+"."+suffix, l.Partitions
	topo.MaxPending = max(topo.MaxPending, l.Writers()*o.BatchSize*2)
	if err := truncate(ctx, pool); err != nil {
		return PartitionsRun{}, err
	}
	if _, err := events.Provision(ctx, js, topo); err != nil {
		return PartitionsRun{}, err
	}
	defer func() {
		delCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = js.DeleteStream(delCtx, topo.Stream)
	}()
	if err := Fill(ctx, js, topo, evs, o.Progress); err != nil {
		return PartitionsRun{}, err
	}
	per := consume.Settings{
		Pool:  consume.Config{Workers: l.Workers, BatchSize: o.BatchSize, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: topo, Finish: 10 * time.Second, NakDelay: time.Second,
	}
	rec := per
	rec.Pool = consume.Config{Workers: 1, BatchSize: o.BatchSize, BatchWait: 20 * time.Millisecond}
	reg := prometheus.NewRegistry()
	start := time.Now()
	running := app.StartPipeline(ctx, pool, js, app.PipelineConfig{Persister: &per, Recovery: &rec, Metrics: reg, Log: o.Log})
	defer func() { _ = running.Stop() }()
	persisted, err := waitDrained(ctx, js, topo, running, o.Progress)
	if err != nil {
		return PartitionsRun{}, err
	}
	elapsed := time.Since(start)
	if err := running.Stop(); err != nil {
		return PartitionsRun{}, err
	}
	if err := checkTable(ctx, pool, len(evs)); err != nil {
		return PartitionsRun{}, err
	}
	r := PartitionsRun{
		RowsPerSec:      float64(len(evs)) / elapsed.Seconds(),
		PersistedPerSec: float64(len(evs)) / persisted.Sub(start).Seconds(),
	}
	if err := readCounters(reg, &r); err != nil {
		return PartitionsRun{}, err
	}
	return r, nil
}

// waitDrained polls every persister consumer and recovery's until none has
// anything pending, and returns when the persisters' were first empty.
// Persisters ack a conflict only after its copy is on the conflict subject,
// so once they are drained, recovery's count is final.
func waitDrained(ctx context.Context, js jetstream.JetStream, topo events.Topology, running *app.Pipeline, w io.Writer) (time.Time, error) {
	var persisted time.Time
	last := time.Now()
	for {
		perLeft, err := pendingOf(ctx, js, topo.Stream, topo.PersisterConsumers())
		if err != nil {
			return persisted, err
		}
		if perLeft == 0 && persisted.IsZero() {
			persisted = time.Now()
		}
		recLeft, err := pendingOf(ctx, js, topo.Stream, []string{topo.Recovery})
		if err != nil {
			return persisted, err
		}
		if perLeft+recLeft == 0 {
			return persisted, nil
		}
		if time.Since(last) > 2*time.Second {
			progress(w, "  %d events and %d conflicts left", perLeft, recLeft)
			last = time.Now()
		}
		select {
		case <-running.Stopped():
			return persisted, fmt.Errorf("pipeline stopped early: %v", running.Wait())
		case <-ctx.Done():
			return persisted, ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// pendingOf sums the named consumers' undelivered and unacknowledged
// messages.
func pendingOf(ctx context.Context, js jetstream.JetStream, stream string, names []string) (uint64, error) {
	var left uint64
	for _, name := range names {
		cons, err := js.Consumer(ctx, stream, name)
		if err != nil {
			return 0, err
		}
		info, err := cons.Info(ctx)
		if err != nil {
			return 0, fmt.Errorf("consumer info: %w", err)
		}
		left += info.NumPending + uint64(info.NumAckPending)
	}
	return left, nil
}

// checkTable fails a run whose table is not what every layout must leave:
// one row per token, one ACTIVE per key, the newest.
func checkTable(ctx context.Context, pool *pgxpool.Pool, want int) error {
	states, err := store.RowsByState(ctx, pool)
	if err != nil {
		return fmt.Errorf("count rows: %w", err)
	}
	var n int64
	for _, c := range states {
		n += c
	}
	if n != int64(want) {
		return fmt.Errorf("%d rows for %d tokens", n, want)
	}
	double, err := store.DoubleActiveKeys(ctx, pool)
	if err != nil {
		return err
	}
	stale, err := store.ActiveNotNewestKeys(ctx, pool)
	if err != nil {
		return err
	}
	if len(double)+len(stale) > 0 {
		return fmt.Errorf("%d keys with two ACTIVE rows, %d whose ACTIVE row is not the newest", len(double), len(stale))
	}
	return nil
}

// readCounters takes conflicts and retries from the roles' own series.
func readCounters(reg *prometheus.Registry, r *PartitionsRun) error {
	families, err := reg.Gather()
	if err != nil {
		return err
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			v := m.GetCounter().GetValue()
			switch f.GetName() {
			case "tokenpipe_persister_conflicts_forwarded_total":
				r.Conflicts += v
			case "tokenpipe_persister_retries_total", "tokenpipe_recovery_retries_total":
				if reasonOf(m.GetLabel()) == "deadlock" {
					r.Deadlocks += v
				} else {
					r.Retries += v
				}
			}
		}
	}
	return nil
}

func reasonOf(labels []*dto.LabelPair) string {
	for _, l := range labels {
		if l.GetName() == "reason" {
			return l.GetValue()
		}
	}
	return ""
}
