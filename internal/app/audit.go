package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
)

const auditUsage = `[-digests FILE] [-coalesce-window D] [-window-bound N] [-client ID] [-since D]

Checks the pipeline's promises: every listed token has exactly one row, no key
has two ACTIVE rows, every ACTIVE row is its key's newest token, and neither
durable consumer has messages pending. It also counts the token rows of each
key per coalescing window of issued_at: a key with more than the bound churns
(each request superseding the token before). Exits 1 on any violation.

  -digests FILE       hex SHA-256 token digests, one per line ("-" for stdin);
                      without it only the table-wide checks and pending run
  -coalesce-window D  the issuers' TOKENPIPE_COALESCE_WINDOW (default: that
                      variable, else 5s); 0 skips the per-window count
  -window-bound N     most tokens a key may have per window (default 2)
  -client ID          count windows of this client only
  -since D            count windows of rows issued in the last D only

Examples:
  tokenpipe audit
  tokenpipe audit -digests issued.txt
  tokenpipe audit -since 1h -client mobile`

var ErrViolations = errors.New("audit found violations")

func RunAudit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	rest, err := LoadConfig("audit", args, stderr, &cfg, auditUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("digests", "", "file of hex token digests, one per line, - for stdin")
	window := fs.Duration("coalesce-window", 0, "the issuers' coalescing window; 0 skips the per-window count (default: TOKENPIPE_COALESCE_WINDOW, else 5s)")
	bound := fs.Int("window-bound", audit.DefaultWindowBound, "most tokens one key may have per coalescing window")
	client := fs.String("client", "", "count windows of this client only")
	since := fs.Duration("since", 0, "count windows of rows issued this long ago or later (0: all rows)")
	if err := fs.Parse(rest); err != nil {
		return HelpIsNil(FlagErr(err))
	}
	windowSet := false
	fs.Visit(func(f *flag.Flag) { windowSet = windowSet || f.Name == "coalesce-window" })
	if !windowSet {
		if *window, err = CoalesceWindowFromEnv(); err != nil {
			fmt.Fprintln(stderr, err)
			return ErrUsage
		}
	}
	if *window < 0 || *window%time.Millisecond != 0 || *bound < 1 || *since < 0 {
		fmt.Fprintln(stderr, "audit: -coalesce-window must be whole milliseconds and not negative, -window-bound at least 1, -since not negative")
		return ErrUsage
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
	pool, err := ConnectPostgres(ctx, &cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	nc, js, err := ConnectNATS(&cfg, "tokenpipe-audit", NewLogger(&cfg, stderr), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	stream, err := js.Stream(ctx, cfg.Stream)
	if err != nil {
		return fmt.Errorf("stream %s: %w", cfg.Stream, err)
	}
	report, err := audit.Check(ctx, pool, digests, stream, append(cfg.Topology().PersisterConsumers(), cfg.RecoveryName)...)
	if err != nil {
		return err
	}
	report.Write(stdout)
	o := audit.ClientOptions{Window: *window, Bound: *bound, ClientID: *client}
	if *since > 0 {
		o.Since = time.Now().Add(-*since)
	}
	mx, over, err := audit.WindowMax(ctx, pool, o)
	if err != nil {
		return err
	}
	clean := report.Clean()
	if *window > 0 {
		fmt.Fprintf(stdout, "most tokens per key per %s window: %d (bound %d; %d key-windows over)", *window, mx.Tokens, *bound, over)
		if mx.Tokens > 0 {
			fmt.Fprintf(stdout, " (key %s, window %s)", mx.Key, mx.Window.Format(time.RFC3339Nano))
		}
		fmt.Fprintln(stdout)
		if over > 0 {
			fmt.Fprintln(stdout, "window result: VIOLATIONS")
			clean = false
		}
	}
	if !clean {
		return ErrViolations
	}
	return nil
}

// CoalesceWindowFromEnv is TOKENPIPE_COALESCE_WINDOW as the issuer reads it,
// so tools judging coalescing use the issuers' window by default.
func CoalesceWindowFromEnv() (time.Duration, error) {
	v, ok := os.LookupEnv(EnvPrefix + "_COALESCE_WINDOW")
	if !ok || v == "" {
		return 5 * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%s_COALESCE_WINDOW: %q is not a duration of 0 or more", EnvPrefix, v)
	}
	return d, nil
}
