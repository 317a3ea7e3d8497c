package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/clients"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/issuer"
	"github.com/tokenpipe/tokenpipe/ops"
)

// IssuerConfig configures the token endpoint.
type IssuerConfig struct {
	Common
	HTTPAddr            string        `envconfig:"HTTP_ADDR" default:":8080" desc:"address of the OAuth2 token endpoint"`
	Mode                string        `envconfig:"MODE" default:"async" desc:"async: answer after JetStream has the event; sync: write the row in the request"`
	TokenTTL            time.Duration `envconfig:"TOKEN_TTL" default:"1h" desc:"access token lifetime"`
	RefreshTTL          time.Duration `envconfig:"REFRESH_TTL" default:"720h" desc:"refresh token lifetime"`
	PublishTimeout      time.Duration `envconfig:"PUBLISH_TIMEOUT" default:"2s" desc:"longest wait for JetStream's ack before answering 503"`
	PublishMaxInFlight  int           `envconfig:"PUBLISH_MAX_INFLIGHT" default:"4096" desc:"most unacknowledged publishes shared by all requests"`
	SyncConflictRetries int           `envconfig:"SYNC_CONFLICT_RETRIES" default:"5" desc:"sync mode: retries when a concurrent request wins the race for a key"`
	ClientCacheTTL      time.Duration `envconfig:"CLIENT_CACHE_TTL" default:"30s" desc:"how long a client's registration is cached; a removed client works this long"`
	Instance            string        `envconfig:"INSTANCE" desc:"name of this issuer in events (default: hostname-pid)"`
	MaxBodyBytes        int64         `envconfig:"MAX_BODY_BYTES" default:"8192" desc:"largest accepted request body"`
	RequireTLS          bool          `envconfig:"REQUIRE_TLS" default:"false" desc:"refuse requests not over TLS (directly or X-Forwarded-Proto: https from a proxy)"`
}

func (c *IssuerConfig) validate() error {
	if err := c.Common.validate(); err != nil {
		return err
	}
	switch {
	case c.Mode != issuer.ModeAsync && c.Mode != issuer.ModeSync:
		return fmt.Errorf("%s_MODE: %q is not async or sync", envPrefix, c.Mode)
	case c.TokenTTL < time.Second:
		return fmt.Errorf("%s_TOKEN_TTL: must be at least 1s", envPrefix)
	case c.PublishTimeout <= 0:
		return fmt.Errorf("%s_PUBLISH_TIMEOUT: must be positive", envPrefix)
	case c.PublishMaxInFlight < 1:
		return fmt.Errorf("%s_PUBLISH_MAX_INFLIGHT: must be at least 1", envPrefix)
	case c.SyncConflictRetries < 0:
		return fmt.Errorf("%s_SYNC_CONFLICT_RETRIES: must not be negative", envPrefix)
	case c.MaxBodyBytes < 256:
		return fmt.Errorf("%s_MAX_BODY_BYTES: must be at least 256", envPrefix)
	case c.HTTPAddr == "":
		return fmt.Errorf("%s_HTTP_ADDR: is empty", envPrefix)
	}
	return nil
}

func (c *IssuerConfig) issuerConfig(topo events.Topology) issuer.Config {
	inst := c.Instance
	if inst == "" {
		inst = instanceName()
	}
	return issuer.Config{
		Mode: c.Mode, TokenTTL: c.TokenTTL, RefreshTTL: c.RefreshTTL, PublishTimeout: c.PublishTimeout,
		SyncConflictRetries: c.SyncConflictRetries, Instance: inst, MaxBodyBytes: c.MaxBodyBytes,
		RequireTLS: c.RequireTLS, Topology: topo,
	}
}

func runIssuer(ctx context.Context, args []string, _, stderr io.Writer) error {
	var cfg IssuerConfig
	if _, err := loadConfig("issuer", args, stderr, &cfg, ""); err != nil {
		return helpIsNil(err)
	}
	log := newLogger(&cfg.Common, stderr).With("role", "issuer", "instance", instanceName())
	srv := ops.NewServer(log)
	srv.Profiling = cfg.Pprof
	pool, err := connectPostgres(ctx, &cfg.Common)
	if err != nil {
		return err
	}
	defer pool.Close()
	var iss *issuer.Server
	registry := clients.NewRegistry(pool, cfg.ClientCacheTTL)
	metrics := issuer.NewMetrics(srv.Registry)
	if cfg.Mode == issuer.ModeAsync {
		nc, _, err := connectNATS(&cfg.Common, "tokenpipe-issuer", log, newConnMetrics(srv.Registry))
		if err != nil {
			return err
		}
		defer func() {
			// In-flight publishes were awaited by their requests; Drain
			// flushes anything else before closing.
			_ = nc.Drain()
		}()
		js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.PublishMaxInFlight))
		if err != nil {
			return fmt.Errorf("jetstream: %w", err)
		}
		if _, err := events.Provision(ctx, js, cfg.Topology()); err != nil {
			return err
		}
		srv.AddCheck(natsCheck(nc))
		iss = issuer.New(cfg.issuerConfig(cfg.Topology()), registry, nc, js, pool, log, metrics)
	} else {
		iss = issuer.New(cfg.issuerConfig(cfg.Topology()), registry, nil, nil, pool, log, metrics)
		// Only sync mode needs Postgres for every token. In async mode the
		// issuer keeps issuing through a database outage (clients are cached),
		// so a Postgres failure must not take it out of its Service.
		srv.AddCheck(pgCheck(pool))
	}
	opsCtx, stopOps := context.WithCancel(context.WithoutCancel(ctx))
	defer stopOps()
	go func() {
		if err := srv.Serve(opsCtx, cfg.OpsAddr); err != nil {
			log.Error("ops server failed", "err", err)
		}
	}()
	go func() { <-ctx.Done(); srv.SetDraining() }()
	return iss.Serve(ctx, cfg.HTTPAddr, cfg.ShutdownTimeout)
}
