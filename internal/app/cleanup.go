package app

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/cleanup"
)

// CleanupConfig tunes the cleanup job, run by `tokenpipe cleanup` or on a
// schedule inside the recovery role.
type CleanupConfig struct {
	CleanupRetention           time.Duration `envconfig:"CLEANUP_RETENTION" default:"24h" desc:"keep a token row this long after its last credential (refresh token, else access token) expired"`
	CleanupRevocationRetention time.Duration `envconfig:"CLEANUP_REVOCATION_RETENTION" default:"744h" desc:"keep family and grant revocations this long; must exceed TOKENPIPE_REFRESH_TTL, the longest a revoked token can live"`
	CleanupBatchSize           int           `envconfig:"CLEANUP_BATCH_SIZE" default:"1000" desc:"most rows one cleanup batch (one short transaction) deletes"`
	CleanupPause               time.Duration `envconfig:"CLEANUP_PAUSE" default:"50ms" desc:"pause between cleanup batches, leaving the database to the persisters"`
}

func (c *CleanupConfig) validate() error {
	switch {
	case c.CleanupRetention < 0:
		return fmt.Errorf("%s_CLEANUP_RETENTION: must not be negative", EnvPrefix)
	case c.CleanupRevocationRetention < time.Hour:
		return fmt.Errorf("%s_CLEANUP_REVOCATION_RETENTION: must be at least 1h (and longer than TOKENPIPE_REFRESH_TTL)", EnvPrefix)
	case c.CleanupBatchSize < 1 || c.CleanupBatchSize > 100000:
		return fmt.Errorf("%s_CLEANUP_BATCH_SIZE: must be between 1 and 100000", EnvPrefix)
	case c.CleanupPause < 0:
		return fmt.Errorf("%s_CLEANUP_PAUSE: must not be negative", EnvPrefix)
	}
	return nil
}

func (c *CleanupConfig) config() cleanup.Config {
	pause := c.CleanupPause
	if pause == 0 {
		pause = -1 // cleanup.Config: zero is the default, negative none
	}
	retention := c.CleanupRetention
	if retention == 0 {
		retention = time.Nanosecond // delete as soon as expired
	}
	return cleanup.Config{Retention: retention, RevocationRetention: c.CleanupRevocationRetention,
		BatchSize: c.CleanupBatchSize, Pause: pause}
}

// CleanupCommandConfig is what `tokenpipe cleanup` reads: Postgres only.
type CleanupCommandConfig struct {
	DatabaseURL string `envconfig:"DATABASE_URL" default:"postgres://postgres@127.0.0.1:5432/tokenpipe?sslmode=disable" desc:"Postgres URL"`
	CleanupConfig
}

func (c *CleanupCommandConfig) validate() error {
	if c.DatabaseURL == "" {
		return fmt.Errorf("%s_DATABASE_URL: is empty", EnvPrefix)
	}
	return c.CleanupConfig.validate()
}

const cleanupUsage = `[-h]

Deletes, in bounded batches with pauses between them:
  - token rows whose access and refresh tokens both expired more than
    TOKENPIPE_CLEANUP_RETENTION ago (in any state; an unexpired INACTIVE or
    REVOKED row is kept, it is what refuses its token);
  - refresh rotations of expired refresh tokens;
  - family and grant revocations older than TOKENPIPE_CLEANUP_REVOCATION_RETENTION.
Each batch is a short transaction that skips rows other transactions hold,
so persisters keep running. Prints progress, then a summary. The recovery
role also runs it every TOKENPIPE_CLEANUP_INTERVAL.

Examples:
  tokenpipe cleanup
  TOKENPIPE_CLEANUP_RETENTION=0s TOKENPIPE_CLEANUP_PAUSE=0s tokenpipe cleanup`

func RunCleanup(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg CleanupCommandConfig
	rest, err := LoadConfig("cleanup", args, stderr, &cfg, cleanupUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) != 0 {
		fmt.Fprintf(stderr, "tokenpipe cleanup takes no arguments (got %q); see tokenpipe cleanup -h\n", rest)
		return ErrUsage
	}
	pool, err := ConnectPostgres(ctx, &Common{DatabaseURL: cfg.DatabaseURL, DBMaxConns: 2})
	if err != nil {
		return err
	}
	defer pool.Close()
	start, last := time.Now(), time.Now()
	st, err := cleanup.Pass(ctx, pool, cfg.config(), func(s cleanup.Stats) {
		if time.Since(last) >= time.Second {
			last = time.Now()
			fmt.Fprintf(stderr, "cleanup: %d rows deleted in %d batches (%s)\n", s.Total(), s.Batches, time.Since(start).Round(time.Second))
		}
	})
	fmt.Fprintf(stdout, "deleted %d token rows, %d refresh rotations, %d token exchanges, %d family and %d grant revocations in %d batches, %s\n",
		st.Tokens, st.Rotations, st.Exchanges, st.RevokedFamilies, st.RevokedGrants, st.Batches, time.Since(start).Round(time.Millisecond))
	return err
}
