package cli

import (
	"github.com/tokenpipe/tokenpipe/internal/app"

	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// matrixOpts sizes the scenario matrix.
type matrixOpts struct {
	runs      int
	events    int
	stepDur   time.Duration
	rampStart float64
	rampStep  float64
	rampMax   float64
	lagBound  time.Duration
	preload   int
	write     string
}

// figure collects one measurement over the runs.
type figure struct{ vals []float64 }

func (f *figure) add(v float64) { f.vals = append(f.vals, v) }

func (f *figure) String() string {
	if len(f.vals) == 0 {
		return "n/a"
	}
	s := slices.Clone(f.vals)
	slices.Sort(s)
	return fmt.Sprintf("%s [%s-%s]", num(s[len(s)/2]), num(s[0]), num(s[len(s)-1]))
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}

// ratio pairs two figures run by run.
func ratio(a, b *figure) *figure {
	r := &figure{}
	for i := range min(len(a.vals), len(b.vals)) {
		if b.vals[i] > 0 {
			r.add(a.vals[i] / b.vals[i])
		}
	}
	return r
}

// runMatrix measures every scenario runs times and prints (and optionally
// writes into BENCHMARKS.md) the table.
func runMatrix(ctx context.Context, cfg *app.Common, o matrixOpts, stdout, stderr io.Writer) error {
	log := app.NewLogger(cfg, io.Discard)
	nc, js, err := app.ConnectNATS(cfg, "tokenpipe-bench", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	f := map[string]*figure{}
	get := func(k string) *figure {
		if f[k] == nil {
			f[k] = &figure{}
		}
		return f[k]
	}
	say := func(format string, a ...any) { fmt.Fprintf(stderr, time.Now().Format("15:04:05 ")+format+"\n", a...) }
	started := time.Now()

	for run := 1; run <= o.runs; run++ {
		say("run %d/%d: ceilings", run, o.runs)
		evs := bench.MakeEvents(o.events)
		err := withScratch(ctx, cfg, js, func(pool *pgxpool.Pool, topo events.Topology) error {
			c, err := bench.CopyCeiling(ctx, pool, evs, 2, 1000)
			if err != nil {
				return err
			}
			get("copy").add(c)
			p, cons, err := bench.JetStreamCeiling(ctx, js, topo, evs)
			get("jspub").add(p)
			get("jscons").add(cons)
			return err
		})
		if err != nil {
			return err
		}
		for _, w := range []int{1, 2, 4} {
			say("run %d/%d: drain with %d workers", run, o.runs, w)
			err := withScratch(ctx, cfg, js, func(pool *pgxpool.Pool, topo events.Topology) error {
				res, err := bench.Drain(ctx, pool, js, bench.DrainOptions{
					Events: o.events, Workers: w, BatchSize: 1000, BatchWait: 20 * time.Millisecond, Runs: 1, Topology: topo, Log: log,
				})
				if err != nil {
					return err
				}
				get(fmt.Sprintf("drain%d", w)).add(res.Runs[0].DrainRowsPerSec)
				get(fmt.Sprintf("drain%dcopy", w)).add(res.Runs[0].CopyRowsPerSec)
				return nil
			})
			if err != nil {
				return err
			}
		}
		scenarios := []struct {
			key     string
			mode    string
			mix     loadgen.Mix
			preload int
		}{
			{"async", issuer.ModeAsync, loadgen.Mix{}, 0},
			{"sync", issuer.ModeSync, loadgen.Mix{}, 0},
			{"conflict", issuer.ModeAsync, loadgen.Mix{Reissue: 0.3, Duplicate: 0.05, DupWidth: 2}, 0},
			{"async1m", issuer.ModeAsync, loadgen.Mix{}, o.preload},
		}
		for _, sc := range scenarios {
			say("run %d/%d: %s ramp", run, o.runs, sc.key)
			err := withScratch(ctx, cfg, js, func(pool *pgxpool.Pool, topo events.Topology) error {
				if sc.preload > 0 {
					say("  preloading %d rows", sc.preload)
					if _, err := bench.CopyCeiling(ctx, pool, bench.MakeEvents(sc.preload), 2, 5000); err != nil {
						return err
					}
					if _, err := pool.Exec(ctx, "VACUUM ANALYZE tokens"); err != nil {
						return err
					}
				}
				p, err := bench.StartPipeline(ctx, pool, nc, bench.PipelineOptions{
					Mode: sc.mode, Workers: 2, BatchSize: 1000, ScopePool: 2000, Topology: topo, Log: log,
				})
				if err != nil {
					return err
				}
				defer p.Stop()
				opts := loadgen.Options{
					Target: loadgen.Target{URL: p.URL, ClientID: p.ClientID, Secret: p.Secret, ScopePool: 2000},
					Mix:    sc.mix, Concurrency: 4096, LagEvery: 1,
					Pool: pool, JS: js, Stream: topo.Stream, Consumers: []string{topo.Persister, topo.Recovery},
					DrainTimeout: time.Minute, Progress: stepLines{stderr},
					Ramp: bench.RampOptions(o.lagBound, o.stepDur, o.rampStart, o.rampStep, o.rampMax),
				}
				rep, err := loadgen.Run(ctx, opts)
				if err != nil {
					return err
				}
				if !rep.Audit.Clean() {
					return fmt.Errorf("%s: audit found violations", sc.key)
				}
				get(sc.key).add(rep.HighestSustained)
				say("  highest sustained %.0f tokens/s", rep.HighestSustained)
				if sc.key != "async" || rep.HighestSustained == 0 {
					return nil
				}
				opts.Ramp, opts.Rate, opts.Duration, opts.Warmup = nil, rep.HighestSustained/2, 10*time.Second, 2*time.Second
				half, err := loadgen.Run(ctx, opts)
				if err != nil {
					return err
				}
				get("halfrate").add(opts.Rate)
				get("halfp50").add(float64(half.Steps[0].Lag.P50.Microseconds()) / 1000)
				get("halfp99").add(float64(half.Steps[0].Lag.P99.Microseconds()) / 1000)
				get("halfhttp99").add(half.Steps[0].HTTP.P99)
				return nil
			})
			if err != nil {
				return err
			}
		}
	}

	var b strings.Builder
	fmt.Fprintf(&b, "Generated by `make bench` (`%s`) on %s in %s.\n", "bin/tokenpipe-dev bench matrix -runs "+fmt.Sprint(o.runs), time.Now().UTC().Format("2006-01-02 15:04 MST"), time.Since(started).Round(time.Second))
	fmt.Fprintf(&b, "Machine: %d CPUs, %s, %s. Median [min-max] of %d runs; every ratio is taken run by run against a ceiling measured in the same run.\n\n", runtime.NumCPU(), runtime.Version(), serverVersions(ctx, cfg, nc), o.runs)
	b.WriteString("| scenario | result | ceiling (same run) | ratio |\n|---|---|---|---|\n")
	fmt.Fprintf(&b, "| raw COPY into tokens, 2 writers, 1000 rows/tx | %s rows/s | | |\n", get("copy"))
	fmt.Fprintf(&b, "| raw JetStream async publish of the events | %s msgs/s | | |\n", get("jspub"))
	fmt.Fprintf(&b, "| raw JetStream Fetch + ack of the events | %s msgs/s | | |\n", get("jscons"))
	for _, w := range []int{1, 2, 4} {
		k := fmt.Sprintf("drain%d", w)
		fmt.Fprintf(&b, "| persister drain, %d worker(s), %d events | %s rows/s | COPY %s | %s |\n", w, o.events, get(k), get(k+"copy"), ratio(get(k), get(k+"copy")))
	}
	fmt.Fprintf(&b, "| async end to end over HTTP: highest rate with p99 issue-to-persisted lag <= %s | %s tokens/s | JetStream publish %s | %s |\n", o.lagBound, get("async"), get("jspub"), ratio(get("async"), get("jspub")))
	fmt.Fprintf(&b, "| async at 50%% of that rate: persist lag p50 / p99, HTTP p99 (ms) | %s / %s / %s | | |\n", get("halfp50"), get("halfp99"), get("halfhttp99"))
	fmt.Fprintf(&b, "| sync end to end over HTTP, same settings | %s tokens/s | async %s | async/sync %s |\n", get("sync"), get("async"), ratio(get("async"), get("sync")))
	fmt.Fprintf(&b, "| async, conflict-heavy mix (30%% re-issue, 5%% duplicates) | %s tokens/s | no-conflict %s | %s |\n", get("conflict"), get("async"), ratio(get("conflict"), get("async")))
	fmt.Fprintf(&b, "| async, table already holding %d rows | %s tokens/s | empty table %s | %s |\n", o.preload, get("async1m"), get("async"), ratio(get("async1m"), get("async")))
	fmt.Fprintf(&b, "\nRamp: start %.0f/s, +%.0f/s per %s step, up to %.0f/s; a step holds if p99 issue-to-persisted lag <= %s, errors <= 1%%, achieved >= 95%% of offered, and every token of the step is persisted. Load generator, issuer, persister (2 workers) and recovery in one process with NATS and Postgres on the same 2 cores.\n",
		o.rampStart, o.rampStep, o.stepDur, o.rampMax, o.lagBound)
	table := b.String()
	fmt.Fprint(stdout, table)
	if o.write != "" {
		return writeSection(o.write, table)
	}
	return nil
}

const beginMark, endMark = "<!-- bench:begin -->", "<!-- bench:end -->"

// writeSection replaces the generated section of the file, keeping the
// hand-written analysis around it.
func writeSection(path, body string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	s := string(old)
	section := beginMark + "\n" + body + endMark
	i, j := strings.Index(s, beginMark), strings.Index(s, endMark)
	if i >= 0 && j > i {
		s = s[:i] + section + s[j+len(endMark):]
	} else {
		s += "\n## Scenario matrix (`make bench`)\n\n" + section + "\n"
	}
	return os.WriteFile(path, []byte(s), 0o644)
}

// withScratch gives f an empty migrated database and a fresh stream, and
// removes both afterwards.
func withScratch(ctx context.Context, cfg *app.Common, js jetstream.JetStream, f func(*pgxpool.Pool, events.Topology) error) error {
	url, drop, err := scratchDatabase(ctx, cfg.DatabaseURL)
	if err != nil {
		return err
	}
	defer drop()
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return err
	}
	pcfg.MaxConns = 16
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := schema.Up(ctx, pool); err != nil {
		return err
	}
	topo := cfg.Topology()
	id := app.RandomID()
	topo.Stream, topo.Prefix = "TPBENCH_"+strings.ToUpper(id), "tpbench."+id
	topo.MaxPending = 50000
	if _, err := events.Provision(ctx, js, topo); err != nil {
		return err
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = js.DeleteStream(dctx, topo.Stream)
	}()
	return f(pool, topo)
}

func serverVersions(ctx context.Context, cfg *app.Common, nc *nats.Conn) string {
	pg := "Postgres ?"
	if conn, err := pgx.Connect(ctx, cfg.DatabaseURL); err == nil {
		var v string
		if conn.QueryRow(ctx, "SHOW server_version").Scan(&v) == nil {
			pg = "PostgreSQL " + strings.Fields(v)[0]
		}
		conn.Close(ctx)
	}
	return pg + ", nats-server " + nc.ConnectedServerVersion()
}

// stepLines passes on only the per-step verdict lines of a ramp.
type stepLines struct{ w io.Writer }

func (s stepLines) Write(p []byte) (int, error) {
	if strings.Contains(string(p), "held=") {
		fmt.Fprint(s.w, "  "+strings.TrimSpace(string(p))+"\n")
	}
	return len(p), nil
}
