package cli

import (
	"github.com/tokenpipe/tokenpipe/internal/app"

	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
)

const loadUsage = `[flags]

Drives a running issuer over real HTTP at a fixed arrival rate (open loop:
requests go out on schedule whether or not earlier ones answered, and latency
counts from the scheduled time), samples both consumers' backlog every 250 ms,
measures issue-to-persisted lag, and at the end verifies that every token that
got a 200 has exactly one row and no key has two ACTIVE rows, that no token
was handed out after its row was already INACTIVE or REVOKED, and that no key
got more than -window-bound distinct tokens in one coalescing window (exit 1
if not). Set -coalesce-window to the issuers' TOKENPIPE_COALESCE_WINDOW (0
when they do not coalesce: then the per-window count is not judged).

Keys are client_credentials scope pairs "pNNNN pMMMM" of one client. Without
-client, a client allowed p0000..p<scope-pool-1> is created in the database.

Examples:
  tokenpipe loadtest -rate 2000 -duration 30s
  tokenpipe loadtest -rate 5000 -reissue 0.3 -dup 0.05 -html run.html -json run.json
  tokenpipe loadtest -rate 700 -dup 1 -dup-width 3 -keys 4 -target http://a:8080/oauth2/token,http://b:8080/oauth2/token
  tokenpipe loadtest -ramp -ramp-start 2000 -ramp-step 2000 -ramp-max 30000 -lag-bound 250ms`

func runLoadtest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg app.Common
	fs := flag.NewFlagSet("loadtest", flag.ContinueOnError)
	target := fs.String("target", "http://127.0.0.1:8080/oauth2/token", "token endpoint URL; several, comma-separated, are used round-robin")
	clientID := fs.String("client", os.Getenv(app.EnvPrefix+"_LOADTEST_CLIENT_ID"), "client id (default: create one; env TOKENPIPE_LOADTEST_CLIENT_ID)")
	secret := fs.String("secret", os.Getenv(app.EnvPrefix+"_LOADTEST_CLIENT_SECRET"), "client secret (env TOKENPIPE_LOADTEST_CLIENT_SECRET)")
	pool := fs.Int("scope-pool", 1000, "scopes p0000.. the client is allowed; keys are pairs of them")
	rate := fs.Float64("rate", 1000, "operations per second")
	duration := fs.Duration("duration", 10*time.Second, "how long to send")
	conc := fs.Int("concurrency", 256, "most requests in flight; beyond it requests are dropped and counted")
	reissue := fs.Float64("reissue", 0, "share of operations re-requesting a key issued earlier")
	dup := fs.Float64("dup", 0, "share of operations sending simultaneous identical requests")
	dupWidth := fs.Int("dup-width", 2, "identical requests per duplicate operation")
	keys := fs.Int("keys", 0, "use only this many keys, asking for them in turn (identical requests); 0: a fresh key per operation")
	ramp := fs.Bool("ramp", false, "step the rate up until a bound is passed; report the highest rate that held")
	rampStart := fs.Float64("ramp-start", 1000, "ramp: first rate")
	rampStep := fs.Float64("ramp-step", 1000, "ramp: increase per step")
	rampMax := fs.Float64("ramp-max", 50000, "ramp: highest rate to try")
	stepDur := fs.Duration("step-duration", 10*time.Second, "ramp: length of each step")
	lagBound := fs.Duration("lag-bound", 250*time.Millisecond, "ramp: p99 issue-to-persisted lag a step may not exceed")
	errBound := fs.Float64("error-bound", 0.01, "ramp: share of failed requests a step may not exceed")
	lagEvery := fs.Int("lag-every", 1, "measure persist lag for every n-th token")
	warmup := fs.Duration("warmup", 0, "send at the rate this long first, unmeasured (tokens still verified)")
	window := fs.Duration("coalesce-window", 0, "the issuers' coalescing window; 0 skips the per-window bound (default: TOKENPIPE_COALESCE_WINDOW, else 5s)")
	bound := fs.Int("window-bound", audit.DefaultWindowBound, "most distinct tokens one key may get per coalescing window")
	deadMargin := fs.Duration("dead-margin", audit.DefaultDeadMargin, "a token counts as handed out dead if its row changed state this much before the request (writers stamp the change at transaction start)")
	drain := fs.Duration("drain-timeout", 2*time.Minute, "longest wait for the queues to drain before verifying")
	jsonOut := fs.String("json", "", "write the full report as JSON to `file`")
	csvOut := fs.String("csv", "", "write the per-second series as CSV to `file`")
	htmlOut := fs.String("html", "", "write a chart page (self-contained HTML) to `file`")
	if _, err := app.LoadConfig("loadtest", args, stderr, &cfg, loadUsage, fs); err != nil {
		return app.HelpIsNil(err)
	}
	if *reissue < 0 || *dup < 0 || *reissue+*dup > 1 || *rate <= 0 || *conc < 1 || *pool < 2 || *keys < 0 {
		fmt.Fprintln(stderr, "loadtest: -reissue and -dup must be shares summing to at most 1; -rate, -concurrency and -scope-pool must be positive, -keys not negative")
		return app.ErrUsage
	}
	windowSet := false
	fs.Visit(func(f *flag.Flag) { windowSet = windowSet || f.Name == "coalesce-window" })
	if !windowSet {
		var err error
		if *window, err = app.CoalesceWindowFromEnv(); err != nil {
			fmt.Fprintln(stderr, err)
			return app.ErrUsage
		}
	}
	if *window < 0 || *window%time.Millisecond != 0 || *bound < 1 || *deadMargin < 0 {
		fmt.Fprintln(stderr, "loadtest: -coalesce-window must be whole milliseconds and not negative, -window-bound at least 1, -dead-margin not negative")
		return app.ErrUsage
	}

	db, err := app.ConnectPostgres(ctx, &cfg)
	if err != nil {
		return err
	}
	defer db.Close()
	nc, js, err := app.ConnectNATS(&cfg, "tokenpipe-loadtest", app.NewLogger(&cfg, stderr), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	if *clientID == "" {
		scopes := make([]string, *pool)
		for i := range scopes {
			scopes[i] = fmt.Sprintf("p%04d", i)
		}
		*clientID = "loadtest-" + app.RandomID()
		if *secret, err = clients.Add(ctx, db, *clientID, scopes, []string{"client_credentials"}); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "created client %s with %d scopes\n", *clientID, *pool)
	}
	urls := strings.Split(*target, ",")
	opts := loadgen.Options{
		Target: loadgen.Target{URL: urls[0], URLs: urls[1:], ClientID: *clientID, Secret: *secret, ScopePool: *pool},
		Mix:    loadgen.Mix{Reissue: *reissue, Duplicate: *dup, DupWidth: *dupWidth, Keys: *keys},
		Rate:   *rate, Duration: *duration, Concurrency: *conc, LagEvery: *lagEvery, Warmup: *warmup,
		Pool: db, JS: js, Stream: cfg.Stream, Consumers: []string{cfg.PersisterName, cfg.RecoveryName},
		CoalesceWindow: *window, WindowBound: *bound, DeadMargin: *deadMargin,
		DrainTimeout: *drain, Progress: stderr, Terminal: app.IsTerminal(stderr),
	}
	if *ramp {
		opts.Ramp = &loadgen.Ramp{Start: *rampStart, Step: *rampStep, Max: *rampMax, StepDuration: *stepDur, LagBound: *lagBound, ErrorBound: *errBound}
	}
	rep, err := loadgen.Run(ctx, opts)
	if err != nil {
		return err
	}
	rep.WriteSummary(stdout)
	for _, out := range []struct {
		path  string
		write func(io.Writer) error
	}{{*jsonOut, rep.WriteJSON}, {*csvOut, rep.WriteCSV}, {*htmlOut, rep.WriteHTML}} {
		if out.path == "" {
			continue
		}
		if err := writeFile(out.path, out.write); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "wrote %s\n", out.path)
	}
	if !rep.Clean() {
		return app.ErrViolations
	}
	return nil
}

// writeFile creates path and writes it with write.
func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	werr := write(f)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("write %s: %w", path, werr)
	}
	return nil
}
