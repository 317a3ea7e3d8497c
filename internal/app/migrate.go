package app

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/internal/schema"
)

// MigrateConfig needs only the database.
type MigrateConfig struct {
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/tokenpipe?sslmode=disable" desc:"Postgres URL"`
	DBMaxConns  int32  `envconfig:"DB_MAX_CONNS" default:"2" desc:"Postgres pool size"`
}

const migrateUsage = `up|status

  up      apply pending migrations (safe to run from several pods at once;
          creates the database if it does not exist)
  status  list migrations and when each was applied

Examples:
  tokenpipe migrate up
  TOKENPIPE_DATABASE_URL=postgres://app@db:5432/tokens tokenpipe migrate status`

func RunMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg MigrateConfig
	rest, err := LoadConfig("migrate", args, stderr, &cfg, migrateUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) != 1 || (rest[0] != "up" && rest[0] != "status") {
		fmt.Fprintln(stderr, "usage: tokenpipe migrate "+migrateUsage)
		return ErrUsage
	}
	common := Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: cfg.DBMaxConns}
	if rest[0] == "up" {
		if err := EnsureDatabase(ctx, cfg.DatabaseURL); err != nil {
			return err
		}
	}
	pool, err := ConnectPostgres(ctx, &common)
	if err != nil {
		return err
	}
	defer pool.Close()
	if rest[0] == "up" {
		applied, err := schema.Up(ctx, pool)
		for _, m := range applied {
			fmt.Fprintf(stdout, "applied %04d_%s\n", m.Version, m.Name)
		}
		if err != nil {
			return err
		}
		if len(applied) == 0 {
			fmt.Fprintln(stdout, "schema is up to date")
		}
		return nil
	}
	list, err := schema.List(ctx, pool)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tNAME\tAPPLIED")
	for _, s := range list {
		at := "pending"
		if !s.AppliedAt.IsZero() {
			at = s.AppliedAt.UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%04d\t%s\t%s\n", s.Version, s.Name, at)
	}
	return tw.Flush()
}

// EnsureDatabase creates the target database when the server answers but the
// database is missing, so a fresh machine needs no manual createdb.
func EnsureDatabase(ctx context.Context, url string) error {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("%s_DATABASE_URL: %w", EnvPrefix, RedactErr(err))
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil {
		return conn.Close(ctx)
	}
	if !isMissingDatabase(err) {
		return fmt.Errorf("connect to Postgres at %s: %w", RedactURL(url), RedactErr(err))
	}
	name := cfg.Database
	cfg.Database = "postgres"
	conn, err = pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to the postgres database to create %q: %w", name, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil && !isDuplicateDatabase(err) {
		return fmt.Errorf("create database %q: %w", name, err)
	}
	return nil
}
