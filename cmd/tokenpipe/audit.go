package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/tokenpipe/tokenpipe/audit"
	"github.com/tokenpipe/tokenpipe/events"
)

const auditUsage = `[-digests FILE]

Checks the pipeline's promises: every listed token has exactly one row, no key
has two ACTIVE rows, every ACTIVE row is its key's newest token, and neither
durable consumer has messages pending. Exits 1 on any violation.

  -digests FILE   hex SHA-256 token digests, one per line ("-" for stdin);
                  without it only the table-wide checks and pending run

Examples:
  tokenpipe audit
  tokenpipe audit -digests issued.txt`

var errViolations = errors.New("audit found violations")

func runAudit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	rest, err := loadConfig("audit", args, stderr, &cfg, auditUsage)
	if err != nil {
		return helpIsNil(err)
	}
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("digests", "", "file of hex token digests, one per line, - for stdin")
	if err := fs.Parse(rest); err != nil {
		return helpIsNil(flagErr(err))
	}
	var digests []events.Digest
	if *file != "" {
		in := io.Reader(os.Stdin)
		if *file != "-" {
			f, err := os.Open(*file)
			if err != nil {
				return fmt.Errorf("digests: %w", err)
			}
			defer f.Close()
			in = f
		}
		if digests, err = audit.ReadDigests(in); err != nil {
			return fmt.Errorf("digests %s: %w", *file, err)
		}
	}
	pool, err := connectPostgres(ctx, &cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	nc, js, err := connectNATS(&cfg, "tokenpipe-audit", newLogger(&cfg, stderr), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	stream, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", cfg.Stream, err)
	}
	report, err := audit.Check(ctx, pool, digests, stream, cfg.PersisterName, cfg.RecoveryName)
	if err != nil {
		return err
	}
	report.Write(stdout)
	if !report.Clean() {
		return errViolations
	}
	return nil
}
