package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
	"github.com/tokenpipe/tokenpipe/internal/schema"
)

// benchScopes is the scope pool of every benchmark client: fresh keys are
// pairs of them, about two million before one repeats.
const benchScopes = 2000

// natsProc is the nats-server the roles use and how it was found.
type natsProc struct {
	url   string
	pid   int // 0: not on this machine or not found
	where string
}

// startModuleNATS runs a JetStream server built from the linked
// nats-server/v2 module as a child process; stop ends it and removes its
// store.
func startModuleNATS(ctx context.Context, stderr io.Writer) (natsProc, func(), error) {
	addr, err := freeLoopback()
	if err != nil {
		return natsProc{}, nil, err
	}
	dir, err := os.MkdirTemp("", "tokenpipe-bench-nats-")
	if err != nil {
		return natsProc{}, nil, fmt.Errorf("nats store: %w", err)
	}
	c, err := startChild(os.Environ(), stderr, "bench", "nats-server", "-addr", addr, "-store", dir)
	if err != nil {
		os.RemoveAll(dir)
		return natsProc{}, nil, err
	}
	stop := func() { c.stop(20 * time.Second); os.RemoveAll(dir) }
	if err := waitListening(ctx, c, addr, 20*time.Second); err != nil {
		stop()
		return natsProc{}, nil, err
	}
	pid := c.cmd.Process.Pid
	return natsProc{url: "nats://" + addr, pid: pid,
		where: "a process built from the nats-server/v2 module, pid " + strconv.Itoa(pid)}, stop, nil
}

// deployOpts shapes one deployment of the roles.
type deployOpts struct {
	nats    natsProc
	env     []string // further TOKENPIPE_* settings for the roles
	preload int      // rows written into the table before the roles start
	say     func(format string, a ...any)
}

// deployment is issuer, persister and recovery as child processes of this
// binary against a scratch database and stream of their own.
type deployment struct {
	pool        *pgxpool.Pool // the benchmark's own connections (benchAppName)
	js          jetstream.JetStream
	topo        events.Topology
	roles       map[string]*child
	nats        natsProc
	natsVersion string
	pgVersion   string
	dbURL       string
	httpAddr    string
	cleanup     []func() // run in reverse by close
}

// deploy starts the roles one at a time and waits for each to be ready. On
// error everything it started is stopped and removed.
func deploy(ctx context.Context, cfg *app.Common, stderr io.Writer, o deployOpts) (_ *deployment, err error) {
	d := &deployment{roles: map[string]*child{}, nats: o.nats}
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	dbURL, dropDB, err := scratchDatabase(ctx, cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	d.dbURL = dbURL
	d.cleanup = append(d.cleanup, dropDB)
	if err := d.connect(ctx, cfg, stderr); err != nil {
		return nil, err
	}
	if o.preload > 0 {
		if err := preload(ctx, d.pool, o.preload, o.say); err != nil {
			return nil, err
		}
	}
	keyBytes := make([]byte, 32)
	if _, err := rand.Read(keyBytes); err != nil {
		return nil, err
	}
	if d.httpAddr, err = freeLoopback(); err != nil {
		return nil, err
	}
	env := append(os.Environ(),
		app.EnvPrefix+"_DATABASE_URL="+dbURL,
		app.EnvPrefix+"_NATS_URL="+d.nats.url,
		app.EnvPrefix+"_STREAM="+d.topo.Stream,
		app.EnvPrefix+"_SUBJECT_PREFIX="+d.topo.Prefix,
		app.EnvPrefix+"_TOKEN_KEYS="+hex.EncodeToString(keyBytes),
		app.EnvPrefix+"_HTTP_ADDR="+d.httpAddr,
		app.EnvPrefix+"_LOG_LEVEL=warn",
		app.EnvPrefix+"_LOG_FORMAT=text",
		// The recovery role's periodic cleanup would be work outside the
		// per-token path; the issue measures the steady path.
		app.EnvPrefix+"_CLEANUP_INTERVAL=0s",
	)
	env = append(env, o.env...)
	for _, role := range []string{"issuer", "persister", "recovery"} {
		c, err := startChild(env, stderr, role)
		if err != nil {
			return nil, err
		}
		d.cleanup = append(d.cleanup, func() { c.stop(20 * time.Second) })
		d.roles[role] = c
		// One at a time: the issuer provisions the stream the others consume.
		if err := c.waitReady(ctx, 60*time.Second); err != nil {
			return nil, err
		}
	}
	fmt.Fprintf(stderr, "roles ready: issuer pid %d, persister pid %d, recovery pid %d, nats-server pid %d; database %s, stream %s\n",
		d.pid("issuer"), d.pid("persister"), d.pid("recovery"), d.nats.pid, app.RedactURL(dbURL), d.topo.Stream)
	return d, nil
}

// connect opens the benchmark's own connections to the scratch database
// (migrated) and to NATS, and names the scratch stream; the stream's removal
// is registered before any role starts, so it runs after they stopped and
// none of them can recreate it.
func (d *deployment) connect(ctx context.Context, cfg *app.Common, stderr io.Writer) error {
	pcfg, err := pgxpool.ParseConfig(d.dbURL)
	if err != nil {
		return fmt.Errorf("%s_DATABASE_URL: %w", app.EnvPrefix, app.RedactErr(err))
	}
	pcfg.MaxConns = 4
	pcfg.ConnConfig.RuntimeParams["application_name"] = benchAppName
	if d.pool, err = pgxpool.NewWithConfig(ctx, pcfg); err != nil {
		return fmt.Errorf("connect to the scratch database: %w", app.RedactErr(err))
	}
	d.cleanup = append(d.cleanup, d.pool.Close)
	if _, err := schema.Up(ctx, d.pool); err != nil {
		return err
	}
	if err := d.pool.QueryRow(ctx, "SHOW server_version").Scan(&d.pgVersion); err != nil {
		return fmt.Errorf("postgres version: %w", err)
	}
	ncfg := *cfg
	ncfg.NATSURL = d.nats.url
	var nc *nats.Conn
	if nc, d.js, err = app.ConnectNATS(&ncfg, "tokenpipe-bench-roles", app.NewLogger(cfg, stderr), nil); err != nil {
		return err
	}
	d.cleanup = append(d.cleanup, nc.Close)
	d.natsVersion = nc.ConnectedServerVersion()
	if d.nats.pid == 0 {
		d.nats.pid, d.nats.where = findNATSProcess(d.nats.url)
	}
	id := app.RandomID()
	d.topo = cfg.Topology()
	d.topo.Stream, d.topo.Prefix = "TPROLES_"+strings.ToUpper(id), "tproles."+id
	d.cleanup = append(d.cleanup, func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		_ = d.js.DeleteStream(dctx, d.topo.Stream)
	})
	return nil
}

// preload writes n rows of other keys into the table, as a table that has
// been in use would hold, and refreshes the planner's statistics.
func preload(ctx context.Context, pool *pgxpool.Pool, n int, say func(string, ...any)) error {
	if say != nil {
		say("  preloading %d rows", n)
	}
	if _, err := bench.CopyCeiling(ctx, pool, bench.MakeEvents(n), 2, 5000); err != nil {
		return fmt.Errorf("preload: %w", err)
	}
	if _, err := pool.Exec(ctx, "VACUUM ANALYZE tokens"); err != nil {
		return fmt.Errorf("preload: %w", err)
	}
	return nil
}

// close stops the roles and removes the scratch database and stream.
func (d *deployment) close() {
	for i := len(d.cleanup) - 1; i >= 0; i-- {
		d.cleanup[i]()
	}
	d.cleanup = nil
}

func (d *deployment) pid(role string) int { return d.roles[role].cmd.Process.Pid }

// newTarget registers a fresh client allowed benchScopes scopes: a
// generator of its own never asks for a key an earlier phase used.
func (d *deployment) newTarget(ctx context.Context) (loadgen.Target, error) {
	scopes := make([]string, benchScopes)
	for i := range scopes {
		scopes[i] = fmt.Sprintf("p%04d", i)
	}
	id := "bench-roles-" + app.RandomID()
	secret, err := clients.Add(ctx, d.pool, id, scopes, []string{"client_credentials"})
	if err != nil {
		return loadgen.Target{}, err
	}
	return loadgen.Target{URL: "http://" + d.httpAddr + "/oauth2/token", ClientID: id, Secret: secret, ScopePool: benchScopes}, nil
}

// measured is a process (or group) whose CPU the benchmark reads.
type measured struct {
	role string
	goal float64 // µs per token; 0 for none
	pid  int     // 0: not found (the row says why)
}

// procs lists the measured processes; the Postgres backends come last and
// are read apart (backendCPU).
func (d *deployment) procs() []measured {
	return []measured{
		{"issuer", 40, d.pid("issuer")},
		{"persister", 20, d.pid("persister")},
		{"recovery", 0, d.pid("recovery")},
		{"nats-server", 40, d.nats.pid},
		{"load generator (this process)", 30, os.Getpid()},
	}
}

// pgRole is the row of the Postgres backends, after procs.
const pgRole = "Postgres (backends of the scratch database)"

// usage is the CPU each measured process used over one interval: procs in
// order, then the Postgres backends; and the whole machine's busy CPU.
type usage struct {
	used    []time.Duration
	machine time.Duration
	wall    time.Duration
}

// cpuOver reads every measured process's CPU before and after f.
func (d *deployment) cpuOver(ctx context.Context, f func() error) (usage, error) {
	procs := d.procs()
	read := func() ([]time.Duration, map[int]time.Duration, time.Duration, error) {
		out := make([]time.Duration, len(procs))
		for i, p := range procs {
			if p.pid == 0 {
				continue
			}
			t, err := bench.ProcCPU(p.pid)
			if err != nil {
				return nil, nil, 0, fmt.Errorf("cpu of %s: %w", p.role, err)
			}
			out[i] = t
		}
		pg, err := backendCPU(ctx, d.pool)
		if err != nil {
			return nil, nil, 0, err
		}
		m, err := bench.MachineCPU()
		if err != nil {
			return nil, nil, 0, fmt.Errorf("machine cpu: %w", err)
		}
		return out, pg, m, nil
	}
	before, pgBefore, mBefore, err := read()
	if err != nil {
		return usage{}, err
	}
	start := time.Now()
	if err := f(); err != nil {
		return usage{}, err
	}
	wall := time.Since(start)
	after, pgAfter, mAfter, err := read()
	if err != nil {
		return usage{}, err
	}
	u := usage{machine: mAfter - mBefore, wall: wall}
	for i := range procs {
		u.used = append(u.used, after[i]-before[i])
	}
	var pg time.Duration
	for pid, t := range pgAfter {
		pg += t - pgBefore[pid] // a backend started in the interval counts whole
	}
	u.used = append(u.used, pg)
	return u, nil
}

// errNoTokens: an interval in which no request got a token measures nothing.
var errNoTokens = errors.New("no request got a token")
