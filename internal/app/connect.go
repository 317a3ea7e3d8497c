package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/ops"
)

// connMetrics counts reconnects so operators can see flapping links.
type connMetrics struct {
	natsReconnects  prometheus.Counter
	natsDisconnects prometheus.Counter
	natsConnected   prometheus.Gauge
}

func newConnMetrics(reg prometheus.Registerer) *connMetrics {
	m := &connMetrics{
		natsReconnects:  prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_nats_reconnects_total", Help: "Reconnections to NATS."}),
		natsDisconnects: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenpipe_nats_disconnects_total", Help: "Losses of the NATS connection."}),
		natsConnected:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "tokenpipe_nats_connected", Help: "1 while connected to NATS."}),
	}
	reg.MustRegister(m.natsReconnects, m.natsDisconnects, m.natsConnected)
	return m
}

// ConnectNATS dials NATS with endless automatic reconnects (with backoff and
// jitter from the client), logging every state change.
func ConnectNATS(c *Common, name string, log *slog.Logger, m *connMetrics) (*nats.Conn, jetstream.JetStream, error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.ReconnectJitter(250*time.Millisecond, time.Second),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				return // our own Close or Drain
			}
			log.Warn("nats disconnected", "err", err)
			if m != nil {
				m.natsDisconnects.Inc()
				m.natsConnected.Set(0)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "url", RedactURL(nc.ConnectedUrl()))
			if m != nil {
				m.natsReconnects.Inc()
				m.natsConnected.Set(1)
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			log.Warn("nats async error", "err", err)
		}),
	}
	if c.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(c.NATSCreds))
	}
	if c.NATSNKey != "" {
		opt, err := nats.NkeyOptionFromSeed(c.NATSNKey)
		if err != nil {
			return nil, nil, fmt.Errorf("%s_NATS_NKEY_FILE: %w", EnvPrefix, err)
		}
		opts = append(opts, opt)
	}
	if c.NATSTLSCA != "" {
		opts = append(opts, nats.RootCAs(c.NATSTLSCA))
	}
	if c.NATSTLSCert != "" || c.NATSTLSKey != "" {
		opts = append(opts, nats.ClientCert(c.NATSTLSCert, c.NATSTLSKey))
	}
	nc, err := nats.Connect(c.NATSURL, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to NATS at %s: %w", RedactURL(c.NATSURL), RedactErr(err))
	}
	if m != nil {
		m.natsConnected.Set(1)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}

// ConnectPostgres opens a pool and checks that the server answers. pgxpool
// reconnects on its own: a broken connection is discarded and a new one dialled
// on the next acquire.
func ConnectPostgres(ctx context.Context, c *Common) (*pgxpool.Pool, error) {
	return ConnectPostgresAs(ctx, c, "tokenpipe")
}

// ConnectPostgresAs is ConnectPostgres with the application_name the
// connections show in pg_stat_activity (unless the URL sets one), so an
// operator can tell the roles' backends, their load and their locks apart.
func ConnectPostgresAs(ctx context.Context, c *Common, name string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(c.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("%s_DATABASE_URL: %w", EnvPrefix, RedactErr(err))
	}
	if cfg.ConnConfig.RuntimeParams["application_name"] == "" {
		cfg.ConnConfig.RuntimeParams["application_name"] = name
	}
	cfg.MaxConns = c.DBMaxConns
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open Postgres pool: %w", RedactErr(err))
	}
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := pool.Ping(pingCtx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to Postgres at %s: %w", RedactURL(c.DatabaseURL), RedactErr(err))
	}
	return pool, nil
}

// isMissingDatabase reports Postgres' "database does not exist".
func isMissingDatabase(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "3D000"
}

// natsCheck and pgCheck are readiness checks.
func natsCheck(nc *nats.Conn) ops.Check {
	return ops.Check{Name: "nats", Func: func(context.Context) error {
		if !nc.IsConnected() {
			return fmt.Errorf("not connected (%s)", nc.Status())
		}
		return nil
	}}
}

func pgCheck(pool *pgxpool.Pool) ops.Check {
	return ops.Check{Name: "postgres", Func: func(ctx context.Context) error { return pool.Ping(ctx) }}
}

// isDuplicateDatabase reports a lost race to create the same database.
func isDuplicateDatabase(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42P04"
}
