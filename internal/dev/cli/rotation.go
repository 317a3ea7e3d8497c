package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

const rotationUsage = `[flags]

Replays API requests through resource servers that use package resource's
middleware (in this process, on loopback) against running issuers: every
request validates its bearer token by introspection and, with -rotate,
exchanges it and returns the successor in Tokenpipe-Next-Token. Devices
(one key each) send in turn, open loop at -rate, each request with the
newest token its device holds. Reports the API latency, the resource
servers' calls to the issuer by endpoint and status, the successors' persist
lag and the consumers' backlog, and the client-visible check: no 401 on a
request that presented its device's newest token or a token inside its batch
window, no successor older than one the device held (exit 1 if any), and
every token the devices held has its row (the audit).

Examples:
  tokenpipe-dev rotationtest -rate 2000 -duration 30s -rotate
  tokenpipe-dev rotationtest -rate 2000 -duration 30s -rotate=false
  tokenpipe-dev rotationtest -issuers http://a:8080,http://b:8080 -servers 4 -rotate`

func runRotationtest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg app.Common
	fs := flag.NewFlagSet("rotationtest", flag.ContinueOnError)
	issuers := fs.String("issuers", "http://127.0.0.1:8080", "issuer base URLs, comma-separated; resource server i uses the i-th, in turn")
	servers := fs.Int("servers", 2, "resource servers in this process")
	rotate := fs.Bool("rotate", true, "exchange the token on every request (per-request rotation); false: validate only")
	devices := fs.Int("devices", 200, "client devices, one key each")
	rate := fs.Float64("rate", 2000, "API requests per second")
	duration := fs.Duration("duration", 30*time.Second, "how long to send")
	conc := fs.Int("concurrency", 512, "most requests in flight; beyond it requests are dropped and counted")
	window := fs.Duration("window", 5*time.Second, "the issuers' TOKENPIPE_ROTATION_WINDOW")
	margin := fs.Duration("margin", 500*time.Millisecond, "a 401 counts against the window only this long before its end (the window starts at the issuer's answer)")
	drain := fs.Duration("drain-timeout", 2*time.Minute, "longest wait for the queues to drain before verifying")
	if _, err := app.LoadConfig("rotationtest", args, stderr, &cfg, rotationUsage, fs); err != nil {
		return app.HelpIsNil(err)
	}
	if *rate <= 0 || *conc < 1 || *devices < 1 || *servers < 1 || *window < 0 || *margin < 0 {
		fmt.Fprintln(stderr, "rotationtest: -rate, -concurrency, -devices and -servers must be positive; -window and -margin not negative")
		return app.ErrUsage
	}
	db, err := app.ConnectPostgres(ctx, &cfg)
	if err != nil {
		return err
	}
	defer db.Close()
	nc, js, err := app.ConnectNATS(&cfg, "tokenpipe-rotationtest", app.NewLogger(&cfg, stderr), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	scopes := make([]string, 2**devices)
	for i := range scopes {
		scopes[i] = fmt.Sprintf("p%04d", i)
	}
	id := "rotation-" + app.RandomID()
	secret, err := clients.Add(ctx, db, id, scopes, []string{"client_credentials", tokens.GrantTokenExchange})
	if err != nil {
		return err
	}
	apiSecret, err := clients.AddWith(ctx, db, id+"-api", nil, nil, clients.Options{Introspect: true})
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "created client %s (%d devices) and resource server %s-api\n", id, *devices, id)
	rep, err := loadgen.RunRotation(ctx, loadgen.RotationOptions{
		Issuers: strings.Split(*issuers, ","), Servers: *servers, Rotate: *rotate,
		ClientID: id, Secret: secret, APIClientID: id + "-api", APISecret: apiSecret,
		Devices: *devices, Rate: *rate, Duration: *duration, Concurrency: *conc, Window: *window, Margin: *margin,
		Pool: db, JS: js, Stream: cfg.Stream, Consumers: []string{cfg.PersisterName, cfg.RecoveryName}, DrainTimeout: *drain,
	})
	if err != nil {
		return err
	}
	rep.WriteSummary(stdout)
	if !rep.Clean() {
		return app.ErrViolations
	}
	return nil
}
