package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
)

// e2eScenarios are the optional scenarios of bench e2e; the plain ramp,
// the CPU intervals and the idle interval always run.
var e2eScenarios = []string{"conflict", "sync", "preload", "drain"}

// e2eOpts sizes bench e2e.
type e2eOpts struct {
	runs        int
	rate        float64 // the fixed rate of the CPU table
	duration    time.Duration
	warmup      time.Duration
	idle        time.Duration
	concurrency int
	ramp        loadgen.Ramp
	preload     int
	drainEvents int
	scenarios   []string
	natsServer  string
	write       string
	charts      string // directory for each ramp's chart page; "" for none
}

func parseE2EFlags(args []string, stderr io.Writer) (e2eOpts, []string, error) {
	fs := flag.NewFlagSet("bench e2e", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o e2eOpts
	fs.IntVar(&o.runs, "runs", 3, "runs of every scenario; medians are reported")
	fs.Float64Var(&o.rate, "rate", 3000, "fixed rate of the CPU table, tokens per second")
	fs.DurationVar(&o.duration, "duration", 15*time.Second, "measured interval at the fixed rate and at the peak")
	fs.DurationVar(&o.warmup, "warmup", 3*time.Second, "unmeasured sending before the fixed-rate interval")
	fs.DurationVar(&o.idle, "idle", 10*time.Second, "interval without traffic for the idle cost")
	fs.IntVar(&o.concurrency, "concurrency", 1024, "most requests in flight")
	fs.Float64Var(&o.ramp.Start, "ramp-start", 2000, "ramp: first rate")
	fs.Float64Var(&o.ramp.Step, "ramp-step", 2000, "ramp: increase per step")
	fs.Float64Var(&o.ramp.Max, "ramp-max", 40000, "ramp: highest rate to try")
	fs.DurationVar(&o.ramp.StepDuration, "step-duration", 5*time.Second, "ramp: length of each step")
	fs.DurationVar(&o.ramp.LagBound, "lag-bound", 250*time.Millisecond, "ramp: p99 issue-to-persisted lag a step may not exceed")
	fs.Float64Var(&o.ramp.ErrorBound, "error-bound", 0.01, "ramp: share of failed requests a step may not exceed")
	fs.IntVar(&o.preload, "preload", 1000000, "rows already in the table for the preload scenario")
	fs.IntVar(&o.drainEvents, "drain-events", 100000, "events in the stream for the drain scenario")
	scen := fs.String("scenarios", strings.Join(e2eScenarios, ","), "optional scenarios to run besides the plain ramp: "+strings.Join(e2eScenarios, ",")+" (empty for none)")
	fs.StringVar(&o.natsServer, "nats-server", "machine", "machine: the server at TOKENPIPE_NATS_URL; module: a nats-server process built from the nats-server/v2 module this binary links")
	fs.StringVar(&o.charts, "charts", "", "write each ramp's chart (HTML, as loadtest -html) into this `directory`")
	fs.StringVar(&o.write, "write", "", "also write the report into this Markdown file (between the bench markers)")
	if err := fs.Parse(args); err != nil {
		return o, nil, app.FlagErr(err)
	}
	bad := o.runs < 1 || o.rate <= 0 || o.duration <= 0 || o.warmup < 0 || o.idle < 0 || o.concurrency < 1 ||
		o.ramp.Start <= 0 || o.ramp.Step <= 0 || o.ramp.Max < o.ramp.Start || o.ramp.StepDuration <= 0 || o.ramp.LagBound <= 0 ||
		o.preload < 0 || o.drainEvents < 1 || (o.natsServer != "machine" && o.natsServer != "module")
	for _, s := range strings.Split(*scen, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		bad = bad || !slices.Contains(e2eScenarios, s)
		o.scenarios = append(o.scenarios, s)
	}
	if bad {
		fmt.Fprintln(stderr, "bench e2e: -runs, -rate, -duration, -concurrency, the ramp's rates and durations and -drain-events must be positive, "+
			"-ramp-max at least -ramp-start, -warmup, -idle and -preload not negative, -nats-server machine or module, -scenarios from "+strings.Join(e2eScenarios, ","))
		return o, nil, app.ErrUsage
	}
	return o, args, nil
}

// e2eRun carries what every phase of bench e2e needs.
type e2eRun struct {
	cfg    *app.Common
	o      e2eOpts
	nats   natsProc
	rep    *bench.E2EReport
	stderr io.Writer
	say    func(format string, a ...any)
}

// runE2E is `tokenpipe bench e2e`, the benchmark of make bench.
func runE2E(ctx context.Context, cfg *app.Common, o e2eOpts, args []string, stdout, stderr io.Writer) error {
	started := time.Now()
	say := func(format string, a ...any) {
		fmt.Fprintf(stderr, "%s [%s] %s\n", time.Now().Format("15:04:05"), time.Since(started).Round(time.Second), fmt.Sprintf(format, a...))
	}
	e := &e2eRun{cfg: cfg, o: o, stderr: stderr, say: say, nats: natsProc{url: cfg.NATSURL}, rep: newE2EReport(o, args)}
	if o.natsServer == "module" {
		np, stop, err := startModuleNATS(ctx, stderr)
		if err != nil {
			return err
		}
		defer stop()
		e.nats = np
	}
	for run := 1; run <= o.runs; run++ {
		if err := e.plain(ctx, run); err != nil {
			return fmt.Errorf("run %d, plain mix: %w", run, err)
		}
		for _, s := range o.scenarios {
			if err := e.scenario(ctx, run, s); err != nil {
				return fmt.Errorf("run %d, %s: %w", run, s, err)
			}
		}
	}
	e.rep.Generated, e.rep.Took = time.Now(), time.Since(started)
	var b strings.Builder
	e.rep.WriteMarkdown(&b)
	fmt.Fprint(stdout, b.String())
	if o.write != "" {
		return writeSection(o.write, beginMark, endMark, b.String())
	}
	return nil
}

// newE2EReport is the report before any figure: what was run, and how.
func newE2EReport(o e2eOpts, args []string) *bench.E2EReport {
	r := o.ramp
	return &bench.E2EReport{
		Command: "bin/tokenpipe-dev bench e2e " + strings.Join(args, " "), Runs: o.runs,
		Machine:  fmt.Sprintf("%d CPUs, %s", runtime.NumCPU(), runtime.Version()),
		LagBound: r.LagBound, GoalRate: 12000, RampTop: r.Start + math.Floor((r.Max-r.Start)/r.Step)*r.Step,
		FixedRate: o.rate, PreloadRows: o.preload, DrainEvents: o.drainEvents, DrainWorkers: 2, Idle: map[string][]float64{},
		Ramp: fmt.Sprintf("start %.0f/s, +%.0f/s per %s step, up to %.0f/s, %d requests in flight at most; "+
			"a step holds if p99 issue-to-persisted lag <= %s, errors <= %.0f%%, achieved >= 95%% of offered, and every token of the step is persisted "+
			"(between steps the ramp waits, at most 4x the lag bound, for the step's rows). "+
			"Every scenario deploys the roles afresh on a scratch database and stream, removed afterwards; coalescing is off.",
			r.Start, r.Step, r.StepDuration, r.Max, o.concurrency, r.LagBound, 100*r.ErrorBound),
	}
}

// plain deploys the roles and measures, in order: idle cost, CPU per token
// at the fixed rate, the ramp to the highest sustained rate, and CPU per
// token at that rate.
func (e *e2eRun) plain(ctx context.Context, run int) error {
	e.say("run %d/%d: plain mix: deploying the roles", run, e.o.runs)
	d, err := e.deploy(ctx, 0)
	if err != nil {
		return err
	}
	defer d.close()
	if e.rep.Fixed == nil {
		e.rep.Fixed, e.rep.Peak = newCosts(d), newCosts(d)
		e.rep.PGVersion, e.rep.NATSVersion, e.rep.NATSWhere = d.pgVersion, d.natsVersion, d.nats.where
	}
	if err := e.idle(ctx, d, run); err != nil {
		return err
	}
	e.say("run %d/%d: %.0f tokens/s for %s (after %s unmeasured)", run, e.o.runs, e.o.rate, e.o.duration, e.o.warmup)
	r, err := e.interval(ctx, d, e.o.rate, e.rep.Fixed)
	if err != nil {
		return err
	}
	e.rep.FixedRuns = append(e.rep.FixedRuns, r)
	e.sayCosts(run, r, e.rep.Fixed)
	peak, err := e.ramp(ctx, d, run, "plain", loadgen.Mix{})
	if err != nil {
		return err
	}
	e.rep.Plain = append(e.rep.Plain, peak)
	if peak == 0 {
		return nil // no step held: there is no peak to measure at
	}
	e.say("run %d/%d: at the peak, %.0f tokens/s for %s", run, e.o.runs, peak, e.o.duration)
	if r, err = e.interval(ctx, d, peak, e.rep.Peak); err != nil {
		return err
	}
	e.rep.PeakRuns = append(e.rep.PeakRuns, r)
	e.sayCosts(run, r, e.rep.Peak)
	return nil
}

func (e *e2eRun) deploy(ctx context.Context, preload int, env ...string) (*deployment, error) {
	// Coalescing would hand one token to many requests of a key: the
	// conflict mix measures the races themselves.
	env = append(env, app.EnvPrefix+"_COALESCE_WINDOW=0s")
	return deploy(ctx, e.cfg, e.stderr, deployOpts{nats: e.nats, env: env, preload: preload, say: e.say})
}

// idle measures the roles' CPU while nothing is sent.
func (e *e2eRun) idle(ctx context.Context, d *deployment, run int) error {
	if e.o.idle == 0 {
		return nil
	}
	e.say("run %d/%d: idle for %s", run, e.o.runs, e.o.idle)
	u, err := d.cpuOver(ctx, func() error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(e.o.idle):
			return nil
		}
	})
	if err != nil {
		return err
	}
	for i, p := range d.procs() {
		if p.role == "issuer" || p.role == "persister" || p.role == "recovery" {
			e.rep.Idle[p.role] = append(e.rep.Idle[p.role], u.used[i].Seconds()/u.wall.Seconds())
		}
	}
	return nil
}

// interval sends fresh keys at rate (after the warm-up) with a client of
// its own and adds each process's CPU per token to costs.
func (e *e2eRun) interval(ctx context.Context, d *deployment, rate float64, costs []bench.RoleCost) (bench.RolesRun, error) {
	target, err := d.newTarget(ctx)
	if err != nil {
		return bench.RolesRun{}, err
	}
	gen := loadgen.New(target, loadgen.Mix{}, e.o.concurrency)
	defer gen.Close()
	if e.o.warmup > 0 {
		gen.Run(ctx, loadgen.Step{Rate: rate, Duration: e.o.warmup, Concurrency: e.o.concurrency}, nil)
	}
	return measureLoad(ctx, d, gen, loadgen.Step{Rate: rate, Duration: e.o.duration, Concurrency: e.o.concurrency}, costs)
}

func (e *e2eRun) sayCosts(run int, r bench.RolesRun, costs []bench.RoleCost) {
	var parts []string
	for _, c := range costs {
		if len(c.PerToken) > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f", strings.Fields(c.Role)[0], c.PerToken[len(c.PerToken)-1]))
		}
	}
	e.say("run %d/%d:   achieved %.0f/s, persist lag p99 %s; µs per token: %s", run, e.o.runs, r.Rate, r.LagP99.Round(time.Millisecond), strings.Join(parts, ", "))
}

// ramp steps the rate up against d with a client of its own and returns
// the highest rate that held; the load generator's audit must be clean.
func (e *e2eRun) ramp(ctx context.Context, d *deployment, run int, name string, mix loadgen.Mix) (float64, error) {
	target, err := d.newTarget(ctx)
	if err != nil {
		return 0, err
	}
	e.say("run %d/%d: %s ramp", run, e.o.runs, name)
	ramp := e.o.ramp
	rep, err := loadgen.Run(ctx, loadgen.Options{
		Target: target, Mix: mix, Concurrency: e.o.concurrency, LagEvery: 1, Ramp: &ramp,
		Pool: d.pool, JS: d.js, Stream: d.topo.Stream, Consumers: []string{d.topo.Persister, d.topo.Recovery},
		WindowBound: audit.DefaultWindowBound, DeadMargin: audit.DefaultDeadMargin,
		DrainTimeout: time.Minute, Progress: stepLines{e.stderr},
	})
	if err != nil {
		return 0, err
	}
	if !rep.Clean() {
		var b strings.Builder
		rep.WriteSummary(&b)
		return 0, fmt.Errorf("%s ramp: the audit found violations:\n%s", name, b.String())
	}
	e.say("run %d/%d:   %s: highest sustained %.0f tokens/s", run, e.o.runs, name, rep.HighestSustained)
	if e.o.charts != "" {
		path := filepath.Join(e.o.charts, fmt.Sprintf("ramp-%s-run%d.html", name, run))
		if err := writeFile(path, rep.WriteHTML); err != nil {
			return 0, err
		}
		e.say("run %d/%d:   wrote %s", run, e.o.runs, path)
	}
	return rep.HighestSustained, nil
}

// scenario runs one optional scenario on a deployment of its own.
func (e *e2eRun) scenario(ctx context.Context, run int, name string) error {
	if name == "drain" {
		return e.drain(ctx, run)
	}
	e.say("run %d/%d: %s: deploying the roles", run, e.o.runs, name)
	var d *deployment
	var err error
	mix := loadgen.Mix{}
	switch name {
	case "conflict":
		mix = loadgen.Mix{Reissue: 0.3, Duplicate: 0.05, DupWidth: 2}
		d, err = e.deploy(ctx, 0)
	case "sync":
		d, err = e.deploy(ctx, 0, app.EnvPrefix+"_MODE=sync")
	case "preload":
		d, err = e.deploy(ctx, e.o.preload)
	}
	if err != nil {
		return err
	}
	defer d.close()
	rate, err := e.ramp(ctx, d, run, name, mix)
	if err != nil {
		return err
	}
	switch name {
	case "conflict":
		e.rep.Conflict = append(e.rep.Conflict, rate)
	case "sync":
		e.rep.Sync = append(e.rep.Sync, rate)
	case "preload":
		e.rep.Preload = append(e.rep.Preload, rate)
	}
	return nil
}

// drain pre-fills a scratch stream and times a persister (2 workers)
// draining it into an empty table against raw COPY of the same rows into
// the same table, in the same run (bench drain, one paired run).
func (e *e2eRun) drain(ctx context.Context, run int) error {
	e.say("run %d/%d: drain of %d events", run, e.o.runs, e.o.drainEvents)
	cfg := *e.cfg
	cfg.NATSURL = e.nats.url
	log := app.NewLogger(&cfg, io.Discard)
	nc, js, err := app.ConnectNATS(&cfg, "tokenpipe-bench", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	return withScratch(ctx, &cfg, js, func(pool *pgxpool.Pool, topo events.Topology) error {
		e.say("run %d/%d:   database %s, stream %s", run, e.o.runs, pool.Config().ConnConfig.Database, topo.Stream)
		res, err := bench.Drain(ctx, pool, js, bench.DrainOptions{Events: e.o.drainEvents, Workers: e.rep.DrainWorkers,
			BatchSize: 1000, BatchWait: 20 * time.Millisecond, Runs: 1, Topology: topo, Log: log})
		if err != nil {
			return err
		}
		r := res.Runs[0]
		e.rep.Drain, e.rep.Copy = append(e.rep.Drain, r.DrainRowsPerSec), append(e.rep.Copy, r.CopyRowsPerSec)
		e.say("run %d/%d:   drain %.0f rows/s, raw COPY %.0f rows/s, ratio %.2f", run, e.o.runs, r.DrainRowsPerSec, r.CopyRowsPerSec, r.Ratio())
		return nil
	})
}
