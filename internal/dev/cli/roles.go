package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// benchAppName marks the benchmark's own Postgres connections, so they are
// not counted as the roles' backends.
const benchAppName = "tokenpipe-bench-roles"

type rolesOpts struct {
	rate        float64
	duration    time.Duration
	warmup      time.Duration
	runs        int
	concurrency int
	natsServer  string // "machine" (TOKENPIPE_NATS_URL) or "module"
	profileDir  string // CPU profiles of the first measured run, when set
	mix         loadgen.Mix
}

func parseRolesFlags(args []string, stderr io.Writer) (rolesOpts, error) {
	fs := flag.NewFlagSet("bench roles", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o rolesOpts
	fs.Float64Var(&o.rate, "rate", 3000, "tokens per second offered")
	fs.DurationVar(&o.duration, "duration", 20*time.Second, "measured interval of each run")
	fs.DurationVar(&o.warmup, "warmup", 5*time.Second, "unmeasured sending at the rate before each measured interval")
	fs.IntVar(&o.runs, "runs", 3, "runs; medians are reported")
	fs.IntVar(&o.concurrency, "concurrency", 256, "most requests in flight")
	fs.StringVar(&o.natsServer, "nats-server", "machine", "machine: the server at TOKENPIPE_NATS_URL; module: a nats-server process built from the nats-server/v2 module this binary links")
	fs.Float64Var(&o.mix.Reissue, "reissue", 0, "share of requests that re-issue a key asked for earlier (conflicts for recovery)")
	fs.Float64Var(&o.mix.Duplicate, "dup", 0, "share of requests sent as a pair of simultaneous identical requests")
	fs.StringVar(&o.profileDir, "profile", "", "write CPU profiles of each role and of the load generator over the first measured run into `dir` (the roles get "+app.EnvPrefix+"_PPROF=true)")
	if err := fs.Parse(args); err != nil {
		return o, app.FlagErr(err) // app.ErrHelp for -h: the caller stops there
	}
	if o.rate <= 0 || o.duration <= 0 || o.warmup < 0 || o.runs < 1 || o.concurrency < 1 || (o.natsServer != "machine" && o.natsServer != "module") ||
		o.mix.Reissue < 0 || o.mix.Duplicate < 0 || o.mix.Reissue+o.mix.Duplicate > 1 {
		fmt.Fprintln(stderr, "bench roles: -rate, -duration, -runs and -concurrency must be positive, -warmup not negative, -nats-server machine or module, -reissue and -dup shares adding up to at most 1")
		return o, app.ErrUsage
	}
	return o, nil
}

// child is one role running as a process of this binary.
type child struct {
	role string
	cmd  *exec.Cmd
	ops  string
	done chan error
	dead bool
}

func startChild(env []string, stderr io.Writer, role string, args ...string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this binary: %w", err)
	}
	ops, err := freeLoopback()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, append([]string{role}, args...)...)
	cmd.Env = append(append([]string{}, env...), app.EnvPrefix+"_OPS_ADDR="+ops)
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", role, err)
	}
	c := &child{role: role, cmd: cmd, ops: ops, done: make(chan error, 1)}
	go func() { c.done <- cmd.Wait() }()
	return c, nil
}

// waitReady polls the child's /readyz until it answers 200.
func (c *child) waitReady(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		select {
		case err := <-c.done:
			c.done <- err
			return fmt.Errorf("%s exited during start: %v", c.role, err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		resp, err := http.Get("http://" + c.ops + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
	}
	return fmt.Errorf("%s not ready after %s", c.role, limit)
}

// stop asks the child to finish (SIGTERM) and kills it if it has not within
// the limit; it always waits for the process.
func (c *child) stop(limit time.Duration) {
	if c.dead {
		return
	}
	c.dead = true
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(limit):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

func freeLoopback() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// runRoles is `tokenpipe bench roles`.
func runRoles(ctx context.Context, cfg *app.Common, o rolesOpts, stdout, stderr io.Writer) error {
	rep := &bench.RolesReport{Rate: o.rate, Duration: o.duration,
		Notes: []string{fmt.Sprintf("CPU is utime+stime from /proc/<pid>/stat (all threads) in clock ticks of 1/%d s, over the measured interval, divided by the tokens issued in it (200 answers)", bench.ClockTicks)}}
	np := natsProc{url: cfg.NATSURL}
	if o.natsServer == "module" {
		var stop func()
		var err error
		if np, stop, err = startModuleNATS(ctx, stderr); err != nil {
			return err
		}
		defer stop()
	}
	// As bench e2e: coalescing would hand one token to many requests of a
	// key, and the conflict mix (-reissue, -dup) measures the races themselves.
	dopts := deployOpts{nats: np, env: []string{app.EnvPrefix + "_COALESCE_WINDOW=0s"}}
	if o.profileDir != "" {
		dopts.env = append(dopts.env, app.EnvPrefix+"_PPROF=true")
	}
	d, err := deploy(ctx, cfg, stderr, dopts)
	if err != nil {
		return err
	}
	defer d.close()
	rep.NATSVersion, rep.NATSWhere, rep.PGVersion = d.natsVersion, d.nats.where, d.pgVersion
	target, err := d.newTarget(ctx)
	if err != nil {
		return err
	}
	gen := loadgen.New(target, o.mix, o.concurrency)
	defer gen.Close()
	costs := newCosts(d)
	for run := 1; run <= o.runs; run++ {
		if o.warmup > 0 {
			gen.Run(ctx, loadgen.Step{Rate: o.rate, Duration: o.warmup, Concurrency: o.concurrency}, nil)
		}
		step := loadgen.Step{Rate: o.rate, Duration: o.duration, Concurrency: o.concurrency}
		var r bench.RolesRun
		measure := func() (err error) {
			r, err = measureLoad(ctx, d, gen, step, costs)
			return err
		}
		if run == 1 && o.profileDir != "" {
			// The profile covers the sending interval; the row count after it
			// is not the product's work.
			err = profileRoles(ctx, d, o.profileDir, int(o.duration.Seconds()), measure)
		} else {
			err = measure()
		}
		if err != nil {
			return fmt.Errorf("run %d: %w", run, err)
		}
		rep.Runs = append(rep.Runs, r)
		fmt.Fprintf(stderr, "run %d/%d: %d tokens (%.0f/s), issuer %.0f µs, persister %.0f µs, postgres %.0f µs per token; failed %v\n",
			run, o.runs, r.Tokens, r.Rate, last(costs[0].PerToken), last(costs[1].PerToken), last(costs[len(costs)-1].PerToken), r.ErrorKinds)
	}
	rep.Roles = costs
	if o.natsServer == "machine" {
		rep.Notes = append(rep.Notes, "the machine's nats-server serves every client on it: its figure includes any other traffic during the interval")
	}
	rep.Notes = append(rep.Notes, "Postgres is the sum over the scratch database's backends in pg_stat_activity (the benchmark's own connections excluded); the WAL writer, checkpointer and autovacuum are not counted")
	rep.WriteTable(stdout)
	return nil
}

// newCosts has one row per measured process of d, then the Postgres
// backends.
func newCosts(d *deployment) []bench.RoleCost {
	var costs []bench.RoleCost
	for _, p := range d.procs() {
		c := bench.RoleCost{Role: p.role, Goal: p.goal}
		if p.pid == 0 {
			c.Missing = "no nats-server process found on this machine"
		}
		costs = append(costs, c)
	}
	return append(costs, bench.RoleCost{Role: pgRole, Goal: 40})
}

// measureLoad sends step with gen and adds each process's CPU per token to
// costs (rows as newCosts makes them); it returns the interval's other
// figures once every token has its row.
func measureLoad(ctx context.Context, d *deployment, gen *loadgen.Generator, step loadgen.Step, costs []bench.RoleCost) (bench.RolesRun, error) {
	var res *loadgen.StepResult
	u, err := d.cpuOver(ctx, func() error {
		res = gen.Run(ctx, step, nil)
		return ctx.Err() // an interrupted interval measures nothing
	})
	if err != nil {
		return bench.RolesRun{}, err
	}
	if res.OK == 0 {
		return bench.RolesRun{}, fmt.Errorf("%w (%v)", errNoTokens, res.Errors)
	}
	wall := res.Ended.Sub(res.Started)
	procs := d.procs()
	var measuredCPU time.Duration
	for i, used := range u.used {
		if i < len(procs) && procs[i].pid == 0 {
			continue
		}
		measuredCPU += used
		costs[i].PerToken = append(costs[i].PerToken, float64(used.Microseconds())/float64(res.OK))
		costs[i].Cores = append(costs[i].Cores, used.Seconds()/wall.Seconds())
	}
	lag, unpersisted, err := persistLag(ctx, d.pool, res.Tokens)
	if err != nil {
		return bench.RolesRun{}, err
	}
	ms := func(q float64) float64 { return float64(res.Latency.ValueAtQuantile(q)) / 1000 }
	return bench.RolesRun{Rate: res.AchievedRate(), HTTPP50: ms(50), HTTPP99: ms(99), LagP50: lag.P50, LagP99: lag.P99,
		MachineCores: u.machine.Seconds() / wall.Seconds(), MeasuredCores: measuredCPU.Seconds() / wall.Seconds(),
		Tokens: res.OK, Errors: res.Sent - res.OK, Unpersisted: unpersisted, ErrorKinds: res.Errors}, nil
}

func last(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return xs[len(xs)-1]
}

// backendCPU maps every backend of the scratch database but the benchmark's
// own to its CPU so far.
func backendCPU(ctx context.Context, pool *pgxpool.Pool) (map[int]time.Duration, error) {
	rows, err := pool.Query(ctx, `SELECT pid FROM pg_stat_activity
		WHERE datname = current_database() AND application_name <> $1`, benchAppName)
	if err != nil {
		return nil, fmt.Errorf("list backends: %w", err)
	}
	var pids []int
	for rows.Next() {
		var pid int
		if err := rows.Scan(&pid); err != nil {
			rows.Close()
			return nil, err
		}
		pids = append(pids, pid)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list backends: %w", err)
	}
	out := make(map[int]time.Duration, len(pids))
	for _, pid := range pids {
		t, err := bench.ProcCPU(pid)
		if errors.Is(err, os.ErrNotExist) {
			continue // the backend ended since the query
		}
		if err != nil {
			return nil, fmt.Errorf("cpu of backend %d (is Postgres on this machine?): %w", pid, err)
		}
		out[pid] = t
	}
	return out, nil
}

// persistLag waits (up to a minute) for the tokens' rows, then measures their
// issue-to-persisted lag.
func persistLag(ctx context.Context, pool *pgxpool.Pool, tokens []loadgen.Token) (loadgen.LagResult, int, error) {
	digests := make([]events.Digest, len(tokens))
	for i, t := range tokens {
		digests[i] = t.Digest
	}
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		n, err := store.CountRows(ctx, pool, digests)
		if err != nil {
			return loadgen.LagResult{}, 0, fmt.Errorf("count rows: %w", err)
		}
		if n >= len(digests) {
			break
		}
		select {
		case <-ctx.Done():
			return loadgen.LagResult{}, 0, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	lag, err := loadgen.PersistLag(ctx, pool, tokens, 1)
	return lag, lag.Unpersisted, err
}

// findNATSProcess finds the local process serving url: the owner of its
// listening port, else the only process whose command line names
// nats-server. 0 if the server is not on this machine or not found.
func findNATSProcess(natsURL string) (int, string) {
	u, err := url.Parse(strings.Split(natsURL, ",")[0])
	if err != nil {
		return 0, "not found"
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		port = 4222
	}
	if pid := bench.ListenerPID(port); pid != 0 {
		return pid, fmt.Sprintf("the machine's server, pid %d, owner of port %d", pid, port)
	}
	pids := bench.PIDsByCommand("nats-server")
	if len(pids) == 1 {
		return pids[0], fmt.Sprintf("the machine's server, pid %d, the only nats-server process", pids[0])
	}
	return 0, fmt.Sprintf("not found (%d nats-server processes, none owning port %d)", len(pids), port)
}

// waitListening waits for the nats-server child to accept connections.
func waitListening(ctx context.Context, c *child, addr string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		select {
		case err := <-c.done:
			c.done <- err
			return fmt.Errorf("nats-server exited during start: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			return nil
		}
	}
	return fmt.Errorf("nats-server not listening on %s after %s", addr, limit)
}

// runNATSServer is the hidden `bench nats-server`: a JetStream server from
// the nats-server/v2 module this binary links, in its own process, until
// SIGTERM. bench roles -nats-server module starts it.
func runNATSServer(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench nats-server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:4223", "listen address")
	dir := fs.String("store", "", "JetStream store directory (required)")
	if err := fs.Parse(args); err != nil {
		return app.HelpIsNil(app.FlagErr(err))
	}
	host, portText, err := net.SplitHostPort(*addr)
	port, perr := strconv.Atoi(portText)
	if err != nil || perr != nil || *dir == "" {
		fmt.Fprintln(stderr, "bench nats-server: -addr must be host:port and -store set")
		return app.ErrUsage
	}
	srv, err := server.NewServer(&server.Options{Host: host, Port: port, JetStream: true,
		StoreDir: filepath.Clean(*dir), NoSigs: true, NoLog: true})
	if err != nil {
		return fmt.Errorf("nats-server: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(15 * time.Second) {
		srv.Shutdown()
		return fmt.Errorf("nats-server %s did not become ready", server.VERSION)
	}
	<-ctx.Done()
	srv.Shutdown()
	srv.WaitForShutdown()
	return nil
}
