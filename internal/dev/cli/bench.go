package cli

import (
	"github.com/tokenpipe/tokenpipe/internal/app"

	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/schema"
)

const benchUsage = `e2e|roles|drain|matrix|partitions [flags]

  e2e     the benchmark of make bench. Every end-to-end scenario with
          issuer, persister and recovery as separate processes of this
          binary (each scenario on a scratch database and stream, removed
          afterwards), the load generator in this process, over HTTP: the
          roles' idle cost; CPU per token per role at -rate and at the peak;
          a ramp to the highest rate keeping p99 issue-to-persisted lag
          under -lag-bound; the conflict-heavy mix, sync mode and a table
          already holding -preload rows as ramps of their own; and the
          persister's drain from a full stream against raw COPY in the same
          run. Prints progress on stderr and a Markdown report; -write FILE
          puts it into FILE between the bench markers.

  drain   pre-fill a scratch stream with token events, then in each run COPY
          the same rows into an empty tokens table (the ceiling) and let a
          persister drain the stream into it; prints both rates and the ratio.
          Uses a scratch database and stream that are removed afterwards.

  roles   issuer, persister and recovery as separate processes of this
          binary against a scratch database and stream, driven at -rate by
          the load generator; prints the CPU each process (and nats-server,
          the database's Postgres backends and the generator) spends per
          token, from /proc/<pid>/stat over the measured interval, against
          the goals. -nats-server module runs a nats-server process built
          from the linked nats-server/v2 module instead of the machine's.

  partitions
          the same tokens (every key re-issued several times, random
          order) drained by today's shared persister consumer (2 and 4
          workers) and by one writer per partition with 1, 2 and 4
          partitions, persisters and recovery in this process; prints
          rows/s, conflicts forwarded to recovery, deadlock and other
          retries per layout, medians of -runs.

Examples:
  tokenpipe bench e2e -runs 3 -write BENCHMARKS.md
  tokenpipe bench e2e -runs 1 -nats-server module -scenarios conflict
  tokenpipe bench drain
  tokenpipe bench partitions -events 50000 -keys 5000 -runs 3
  tokenpipe bench roles -rate 3000 -duration 20s -runs 3
  tokenpipe bench matrix -runs 3 -write BENCHMARKS.md
  tokenpipe bench drain -events 500000 -workers 4 -runs 5`

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg app.Common
	rest, err := app.LoadConfig("bench", args, stderr, &cfg, benchUsage)
	if err != nil {
		return app.HelpIsNil(err)
	}
	if len(rest) > 0 && rest[0] == "matrix" {
		fs := flag.NewFlagSet("bench matrix", flag.ContinueOnError)
		fs.SetOutput(stderr)
		var o matrixOpts
		fs.IntVar(&o.runs, "runs", 3, "runs of every scenario; medians are reported")
		fs.IntVar(&o.events, "events", 100000, "events for the ceilings and drains")
		fs.StringVar(&o.write, "write", "", "also write the table into this Markdown file (between the bench matrix markers)")
		if err := fs.Parse(rest[1:]); err != nil {
			return app.HelpIsNil(app.FlagErr(err))
		}
		return runMatrix(ctx, &cfg, o, stdout, stderr)
	}
	if len(rest) > 0 && rest[0] == "e2e" {
		o, args, err := parseE2EFlags(rest[1:], stderr)
		if err != nil {
			return app.HelpIsNil(err)
		}
		return runE2E(ctx, &cfg, o, args, stdout, stderr)
	}
	if len(rest) > 0 && rest[0] == "roles" {
		o, err := parseRolesFlags(rest[1:], stderr)
		if err != nil {
			return app.HelpIsNil(err)
		}
		return runRoles(ctx, &cfg, o, stdout, stderr)
	}
	if len(rest) > 0 && rest[0] == "partitions" {
		return runPartitions(ctx, &cfg, rest[1:], stdout, stderr)
	}
	if len(rest) > 0 && rest[0] == "nats-server" {
		return runNATSServer(ctx, rest[1:], stderr)
	}
	if len(rest) == 0 || rest[0] != "drain" {
		fmt.Fprintln(stderr, "usage: tokenpipe bench "+benchUsage)
		return app.ErrUsage
	}
	return runDrain(ctx, &cfg, rest[1:], stdout, stderr)
}

// runDrain is `tokenpipe bench drain`.
func runDrain(ctx context.Context, cfg *app.Common, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench drain", flag.ContinueOnError)
	fs.SetOutput(stderr)
	n := fs.Int("events", 200000, "events to pre-fill")
	workers := fs.Int("workers", 2, "persister workers, and COPY writers for the ceiling")
	batch := fs.Int("batch", 1000, "events per batch, rows per COPY")
	runs := fs.Int("runs", 3, "paired runs; medians are reported")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of this process to `file`")
	if err := fs.Parse(args); err != nil {
		return app.HelpIsNil(app.FlagErr(err))
	}
	if *cpuProfile != "" {
		stop, err := startCPUProfile(*cpuProfile)
		if err != nil {
			return err
		}
		defer stop()
	}
	log := app.NewLogger(cfg, stderr)
	pool, closeScratch, err := migratedScratch(ctx, cfg, int32(*workers+2))
	if err != nil {
		return err
	}
	defer closeScratch()
	nc, js, err := app.ConnectNATS(cfg, "tokenpipe-bench", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	topo := cfg.Topology()
	id := app.RandomID()
	topo.Stream, topo.Prefix = "TPBENCH_"+strings.ToUpper(id), "tpbench."+id
	topo.MaxPending = max(topo.MaxPending, *workers**batch*2)
	defer func() {
		delCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = js.DeleteStream(delCtx, topo.Stream)
	}()
	res, err := bench.Drain(ctx, pool, js, bench.DrainOptions{
		Events: *n, Workers: *workers, BatchSize: *batch, BatchWait: 20 * time.Millisecond, Runs: *runs,
		Topology: topo, Progress: stderr, Log: log.With("component", "bench"),
	})
	if err != nil {
		return err
	}
	c, d, r := res.Copy(), res.Drain(), res.Ratio()
	fmt.Fprintf(stdout, "drain benchmark: %d events, %d workers, batch %d, %d runs (median [min-max])\n", *n, *workers, *batch, *runs)
	fmt.Fprintf(stdout, "  raw COPY ceiling  %8.0f rows/s  [%.0f-%.0f]\n", c.Median, c.Min, c.Max)
	fmt.Fprintf(stdout, "  persister drain   %8.0f rows/s  [%.0f-%.0f]\n", d.Median, d.Min, d.Max)
	fmt.Fprintf(stdout, "  ratio             %8.2f         [%.2f-%.2f]\n", r.Median, r.Min, r.Max)
	return nil
}

// migratedScratch creates a scratch database with the schema and a pool of
// at most maxConns connections to it; release closes the pool and drops it.
func migratedScratch(ctx context.Context, cfg *app.Common, maxConns int32) (pool *pgxpool.Pool, release func(), err error) {
	dbURL, dropDB, err := scratchDatabase(ctx, cfg.DatabaseURL)
	if err != nil {
		return nil, nil, err
	}
	scratch := *cfg
	scratch.DatabaseURL = dbURL
	scratch.DBMaxConns = maxConns
	if pool, err = app.ConnectPostgres(ctx, &scratch); err != nil {
		dropDB()
		return nil, nil, err
	}
	release = func() { pool.Close(); dropDB() }
	if _, err := schema.Up(ctx, pool); err != nil {
		release()
		return nil, nil, err
	}
	return pool, release, nil
}

// scratchDatabase creates a uniquely named database next to the configured
// one and returns its URL and a function that drops it.
func scratchDatabase(ctx context.Context, url string) (string, func(), error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return "", nil, fmt.Errorf("%s_DATABASE_URL: %w", app.EnvPrefix, app.RedactErr(err))
	}
	admin := cfg.Copy()
	admin.Database = "postgres"
	conn, err := pgx.ConnectConfig(ctx, admin)
	if err != nil {
		return "", nil, fmt.Errorf("connect to Postgres at %s: %w", app.RedactURL(url), app.RedactErr(err))
	}
	name := "tokenpipe_scratch_" + app.RandomID()
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		conn.Close(ctx)
		return "", nil, fmt.Errorf("create scratch database: %w", err)
	}
	conn.Close(ctx)
	drop := func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		c, err := pgx.ConnectConfig(dctx, admin)
		if err != nil {
			return
		}
		defer c.Close(dctx)
		_, _ = c.Exec(dctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	}
	return schema.WithDatabase(url, name), drop, nil
}

// startCPUProfile profiles this process until stop is called, so a missed
// target comes with the evidence of where the time went.
func startCPUProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
