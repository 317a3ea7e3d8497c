package cli

import (
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/store"

	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/dev/demo"
	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const demoUsage = `[-requests N] [-races N] [-stay]

Runs issuer, persister and recovery in one process, sends real HTTP token
requests (distinct keys, then bursts of identical requests racing for one
key, which coalescing turns into one token each), makes two different tokens
of one key race through recovery, waits until both consumers are drained,
audits the table and prints a summary. Uses an embedded NATS server unless TOKENPIPE_NATS_URL is set, and
Postgres at TOKENPIPE_DATABASE_URL (the database is created if missing).

Examples:
  tokenpipe demo
  tokenpipe demo -requests 20000 -races 1000 -stay`

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg app.IssuerConfig
	_, natsSet := os.LookupEnv(app.EnvPrefix + "_NATS_URL")
	_, adminsSet := os.LookupEnv(app.EnvPrefix + "_ADMIN_USERS")
	rest, err := app.LoadConfigWith("demo", args, stderr, &cfg, demoUsage, func() { demoDefaults(&cfg) })
	if err != nil {
		return app.HelpIsNil(err)
	}
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	requests := fs.Int("requests", 2000, "requests for distinct keys")
	races := fs.Int("races", 250, "keys requested by 4 simultaneous requests each")
	stay := fs.Bool("stay", false, "keep the endpoint up after the summary, until Ctrl-C")
	if err := fs.Parse(rest); err != nil {
		return app.HelpIsNil(app.FlagErr(err))
	}
	log := app.NewLogger(&cfg.Common, stderr)
	say := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }

	if !natsSet {
		srv, err := demo.StartNATS()
		if err != nil {
			return err
		}
		defer srv.Shutdown()
		cfg.NATSURL = srv.URL()
		say("started an embedded NATS server with JetStream at %s", app.RedactURL(cfg.NATSURL))
	}
	if err := app.EnsureDatabase(ctx, cfg.DatabaseURL); err != nil {
		return fmt.Errorf("%w\nno Postgres answered: start one, or point TOKENPIPE_DATABASE_URL at one (e.g. postgres://user@host:5432/tokenpipe)", err)
	}
	pool, err := app.ConnectPostgres(ctx, &cfg.Common)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := schema.Up(ctx, pool); err != nil {
		return err
	}
	nc, _, err := app.ConnectNATS(&cfg.Common, "tokenpipe-demo", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	topo := cfg.Topology()
	js, err := issuer.NewJetStream(nc, cfg.IssuerSettings(topo))
	if err != nil {
		return err
	}
	stream, err := events.Provision(ctx, js, topo)
	if err != nil {
		return err
	}

	clientID := "demo-" + app.RandomID()
	scopes := make([]string, 64)
	for i := range scopes {
		scopes[i] = fmt.Sprintf("s%02d", i)
	}
	secret, err := clients.Add(ctx, pool, clientID, scopes, []string{"client_credentials"})
	if err != nil {
		return err
	}
	say("database %s migrated; demo client %s registered", app.RedactURL(cfg.DatabaseURL), clientID)

	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		ln, err = net.Listen("tcp", "127.0.0.1:0") // the usual port is taken: any will do
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
	}
	addr := ln.Addr().String()
	ln.Close()

	if cfg.IssuerURL == "" {
		cfg.IssuerURL = "http://" + addr // the demo's own server, for its metadata document
	}
	registry := clients.NewRegistry(pool, cfg.ClientCacheTTL)
	icfg := cfg.IssuerSettings(topo)
	retry := (&app.WorkerConfig{RetryMaxElapsed: time.Minute}).RetryPolicy()
	per := consume.Settings{Pool: consume.Config{Workers: 2, BatchSize: 1000, BatchWait: 20 * time.Millisecond},
		Retry: retry, Topology: topo, Finish: cfg.ShutdownTimeout, NakDelay: time.Second}
	rec := per
	rec.Pool = consume.Config{Workers: 1, BatchSize: 500, BatchWait: 20 * time.Millisecond}
	roles := app.StartPipeline(context.WithoutCancel(ctx), pool, js, app.PipelineConfig{
		Persister: &per, Recovery: &rec,
		Issuer: &icfg, Clients: registry, NC: nc, Addr: addr, IssuerGrace: cfg.ShutdownTimeout,
		Metrics: prometheus.NewRegistry(), Log: log,
		OnStop: func(_ string, err error) { log.Error("demo role stopped", "err", err) },
	})
	defer func() { _ = roles.Stop() }()
	tokenURL := "http://" + addr + "/oauth2/token"
	if err := waitHTTP(ctx, addr); err != nil {
		return err
	}
	say("issuer, persister and recovery running; token endpoint %s", tokenURL)

	out, err := demo.Send(ctx, demo.Traffic{
		URL: tokenURL, ClientID: clientID, ClientSecret: secret, Scopes: scopes,
		Requests: *requests, RaceKeys: *races, RaceWidth: 4, Concurrency: 32,
	})
	if err != nil {
		return err
	}
	say("sent %d requests in %s: %d tokens issued, %d failed %v", out.OK+out.Failed, out.Elapsed.Round(time.Millisecond), out.OK, out.Failed, out.Errors)
	raced, err := raceDemo(ctx, icfg, registry, nc, js, pool, log, tokenURL, clientID, secret, say)
	if err != nil {
		return fmt.Errorf("race step: %w", err)
	}
	out.OK += len(raced)
	out.Digests = append(out.Digests, raced...)

	drainStart := time.Now()
	var report *audit.Report
	for {
		report, err = audit.Check(ctx, pool, out.Digests, stream, append(topo.PersisterConsumers(), topo.Recovery)...)
		if err != nil {
			return err
		}
		var pending uint64
		for _, n := range report.Pending {
			pending += n
		}
		if pending == 0 && len(report.Missing) == 0 {
			break
		}
		if time.Since(drainStart) > time.Minute {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	states, err := store.ClientStates(ctx, pool, clientID)
	if err != nil {
		return err
	}
	active, inactive := states["ACTIVE"], states["INACTIVE"]
	say("")
	say("summary")
	say("  issued (HTTP 200)                    %d", out.OK)
	say("  persisted rows                       %d (%d ACTIVE, %d INACTIVE)", active+inactive, active, inactive)
	say("  distinct tokens                      %d (identical requests in one window share one)", report.Tokens)
	say("  race losers made INACTIVE            %d", inactive)
	say("  tokens without a row                 %d", len(report.Missing))
	say("  keys with more than one ACTIVE row   %d", len(report.DoubleActive))
	say("  ACTIVE rows that are not the newest  %d", len(report.ActiveNotNewest))
	say("  queue drained in                     %s", time.Since(drainStart).Round(time.Millisecond))
	if !report.Clean() {
		return app.ErrViolations
	}
	say("")
	say("the two tokens of the race step, the older made INACTIVE by recovery:")
	if err := raceRows(ctx, pool, raced, say); err != nil {
		return err
	}
	say("")
	say("OAuth lifecycle")
	base := "http://" + addr
	lines, err := lifecycleDemo(ctx, pool, base, say)
	if err != nil {
		return fmt.Errorf("lifecycle: %w", err)
	}
	say("")
	say("try it by hand (AT and RT are the access and refresh token of an answer):")
	say("  curl -s -u '%s:%s' -d grant_type=client_credentials -d scope='s01 s02' %s", clientID, secret, tokenURL)
	for _, l := range lines {
		say("  %s", l)
	}
	say("  curl -s -H 'Authorization: Bearer %s' %s/admin/clients/%s/tokens", cfg.AdminToken, base, clientID)
	admin := cfg.AdminUsers
	if adminsSet {
		admin = ""
	}
	pageLines, err := pagesDemo(ctx, pool, base, admin)
	if err != nil {
		return fmt.Errorf("pages: %w", err)
	}
	say("")
	say("the pages, in a browser (the passwords are made up for this run and shown only here):")
	for _, l := range pageLines {
		say("  %s", l)
	}
	if *stay {
		say("\nthe endpoint stays up until Ctrl-C")
		<-ctx.Done()
	} else {
		say("(run 'tokenpipe demo -stay' to keep the endpoint up for that)")
	}
	return nil
}

// demoDefaults are the demo's own defaults for variables the environment
// does not set: quiet text logs (the summary is the demo's output), the usual
// port, and keys made up for this run. One process, so a made-up key is
// shared by every "issuer" there is; a real deployment gives all issuers the
// same configured key.
func demoDefaults(cfg *app.IssuerConfig) {
	unset := func(name string) bool { _, ok := os.LookupEnv(app.EnvPrefix + name); return !ok }
	if unset("_LOG_LEVEL") {
		cfg.LogLevel = "warn"
	}
	if unset("_LOG_FORMAT") {
		cfg.LogFormat = "text"
	}
	if unset("_HTTP_ADDR") {
		cfg.HTTPAddr = "127.0.0.1:8080"
	}
	if unset("_TOKEN_KEYS") {
		cfg.TokenKeys = app.RandomKey()
	}
	if unset("_ADMIN_TOKEN") {
		cfg.AdminToken = app.RandomKey()
	}
	if unset("_ADMIN_USERS") {
		cfg.AdminUsers = "demo-admin-" + app.RandomID()
	}
}

// waitHTTP waits until something listens on addr.
func waitHTTP(ctx context.Context, addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("issuer did not start listening at %s", addr)
}
