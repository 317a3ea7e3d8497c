package app

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/status"
)

const statusUsage = `[--watch] [--json] [--no-rows]

Shows the stream (messages, bytes, first and last sequence and time, the
retention limits that set how far back a replay can reach, messages per
subject), every consumer (pending, ack pending, redelivered, waiting pulls,
last delivered and acked stream sequence, age of the oldest unacknowledged
message, and KEDA's lag: num_pending + num_ack_pending), and the tokens
table's rows by state. Ephemeral consumers are marked: tokenpipe-tool-*
ones belong to a running replay, dlq or status command.

Counting rows scans the tokens table; on a very large table use --no-rows,
especially with --watch. If Postgres is unreachable the stream part is still
shown.

Examples:
  tokenpipe status
  tokenpipe status --watch
  tokenpipe status --json | jq '.consumers[] | {name, keda_lag}'
  tokenpipe status --watch --json --no-rows > lag.ndjson`

func RunStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	watch := fs.Bool("watch", false, "refresh until Ctrl-C (in place on a terminal; one report per interval otherwise)")
	interval := fs.Duration("interval", time.Second, "refresh interval for --watch")
	asJSON := fs.Bool("json", false, "print JSON (with --watch: one object per line)")
	noRows := fs.Bool("no-rows", false, "do not count the tokens table's rows")
	rest, err := LoadConfig("status", args, stderr, &cfg, statusUsage, fs)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) > 0 || *interval < 100*time.Millisecond {
		fmt.Fprintln(stderr, "usage: tokenpipe status "+statusUsage)
		return ErrUsage
	}
	nc, js, err := ConnectNATS(&cfg, "tokenpipe-status", NewLogger(&cfg, stderr).With("role", "status"), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	var db status.DB
	dbErr := ""
	if !*noRows {
		cfg.DBMaxConns = 1
		pool, err := ConnectPostgres(ctx, &cfg)
		if err != nil {
			dbErr = err.Error()
		} else {
			defer pool.Close()
			db = pool
		}
	}
	topo := cfg.Topology()
	gather := func() (*status.Report, error) {
		reqCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		r, err := status.Gather(reqCtx, js, db, topo)
		if err == nil && dbErr != "" {
			r.RowsError = dbErr
		}
		return r, err
	}
	render := func(r *status.Report) ([]byte, error) {
		var buf bytes.Buffer
		if *asJSON {
			enc := json.NewEncoder(&buf)
			if !*watch {
				enc.SetIndent("", "  ")
			}
			err := enc.Encode(r)
			return buf.Bytes(), err
		}
		r.WriteTable(&buf)
		return buf.Bytes(), nil
	}

	if !*watch {
		r, err := gather()
		if err != nil {
			return err
		}
		out, err := render(r)
		if err != nil {
			return err
		}
		_, err = stdout.Write(out)
		return err
	}

	inPlace := IsTerminal(stdout) && !*asJSON
	t := time.NewTicker(*interval)
	defer t.Stop()
	for {
		// A failed snapshot is shown and retried: a watch is most useful
		// while something is broken.
		r, err := gather()
		var out []byte
		if err == nil {
			out, err = render(r)
		}
		if err != nil {
			out = fmt.Appendf(nil, "%s status failed: %v\n", time.Now().Format(time.RFC3339), err)
		}
		if inPlace {
			// Home and clear, then the whole frame in one write, so it
			// does not flicker.
			out = append([]byte("\033[H\033[2J"), out...)
		} else if !*asJSON {
			out = append(out, '\n')
		}
		if _, err := stdout.Write(out); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
