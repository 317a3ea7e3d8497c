package app

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

const replayUsage = `--all | --from-seq N [--to-seq M] | --since T [--until T] [flags]

Re-drives a range of the token stream through the persister's write path and,
for tokens that meet an older ACTIVE token, recovery's rule (the newest stream
sequence per key stays ACTIVE; TokenDeactivated notices are published). Every
event keeps its ORIGINAL stream sequence, so replaying old events never
reactivates an older token. Tokens that already have a row are left alone:
replaying twice is harmless, and it is safe while the workers run.

Reads with an ordered consumer of its own, never the durable consumers, and
removes it on exit, Ctrl-C included. Ctrl-C finishes the batches in hand
(at most TOKENPIPE_SHUTDOWN_TIMEOUT) and prints where to resume. Poison in the
range is copied to the dead subject once (see 'tokenpipe dlq').

T is an RFC 3339 time or a duration back from now (2h, 90m, 3d). The range
ends at the stream's last message when the replay starts; events older than
TOKENPIPE_STREAM_MAX_AGE are gone and cannot be replayed.

Examples:
  tokenpipe replay --since 2h --dry-run
  tokenpipe replay --since 2026-03-01T00:00:00Z --until 2026-03-01T06:00:00Z
  tokenpipe replay --from-seq 1200000 --to-seq 1300000 --workers 4
  tokenpipe replay --all --json > replay.json`

func RunReplay(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	all := fs.Bool("all", false, "replay everything the stream still holds")
	fromSeq := fs.Uint64("from-seq", 0, "first stream `sequence` of the range")
	toSeq := fs.Uint64("to-seq", 0, "last stream `sequence` of the range")
	since := fs.String("since", "", "start `time`: RFC 3339, or a duration back from now (2h, 3d)")
	until := fs.String("until", "", "end `time`: RFC 3339, or a duration back from now")
	subject := fs.String("subject", "", "subject to replay (default: the issued subject, every partition's when partitioned; the conflict subject, or the unpartitioned issued subject after partitioning was turned on, also work)")
	dryRun := fs.Bool("dry-run", false, "report what would be inserted or is already present; write nothing")
	workers := fs.Int("workers", 2, "concurrent batches (database transactions)")
	batch := fs.Int("batch", 1000, "events per batch")
	linger := fs.Duration("linger", 20*time.Millisecond, "longest wait to fill a batch")
	asJSON := fs.Bool("json", false, "print the summary as JSON")
	rest, err := LoadConfig("replay", args, stderr, &cfg, replayUsage, fs)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) > 0 {
		fmt.Fprintf(stderr, "replay: unexpected argument %q\n", rest[0])
		return ErrUsage
	}
	o := replay.Options{
		FromSeq: *fromSeq, ToSeq: *toSeq, Subject: *subject, DryRun: *dryRun,
		Workers: *workers, BatchSize: *batch, Linger: *linger, Finish: cfg.ShutdownTimeout,
	}
	now := time.Now()
	for _, tf := range []struct {
		name, value string
		dst         *time.Time
	}{{"since", *since, &o.Since}, {"until", *until, &o.Until}} {
		if tf.value == "" {
			continue
		}
		if *tf.dst, err = replay.ParseTime(tf.value, now); err != nil {
			fmt.Fprintf(stderr, "replay: --%s: %v\n", tf.name, err)
			return ErrUsage
		}
	}
	hasRange := o.FromSeq != 0 || o.ToSeq != 0 || !o.Since.IsZero() || !o.Until.IsZero()
	switch {
	case *all && hasRange:
		fmt.Fprintln(stderr, "replay: --all replays everything; give it alone or give a range")
		return ErrUsage
	case !*all && !hasRange:
		// A whole-stream replay is safe but heavy: it has to be asked for.
		fmt.Fprintln(stderr, "replay: give a range (--from-seq/--to-seq or --since/--until) or --all; -h for help")
		return ErrUsage
	case *workers < 1 || *workers > 64 || *batch < 1 || *batch > 10000 || *linger <= 0:
		fmt.Fprintln(stderr, "replay: --workers must be 1..64, --batch 1..10000, --linger positive")
		return ErrUsage
	}

	log := NewLogger(&cfg, stderr).With("role", "replay")
	if cfg.DBMaxConns < int32(*workers+1) {
		cfg.DBMaxConns = int32(*workers + 1)
	}
	pool, err := ConnectPostgres(ctx, &cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	nc, js, err := ConnectNATS(&cfg, "tokenpipe-replay", log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()

	o.Progress = replay.ProgressPrinter(stderr, IsTerminal(stderr), 5*time.Second)
	w := &replay.Writer{DB: pool, JS: js, Topology: cfg.Topology(), Retry: store.DefaultRetryPolicy(), Log: log}
	sum, err := replay.Run(ctx, w, o)
	if sum == nil {
		return err
	}
	if warning := sum.WindowWarning(o); warning != "" {
		fmt.Fprintln(stderr, warning)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if jerr := enc.Encode(sum); jerr != nil {
			return errors.Join(err, jerr)
		}
	} else {
		sum.Write(stdout)
	}
	switch {
	case err == nil:
		return nil
	case sum.Interrupted:
		return fmt.Errorf("interrupted; resume with --from-seq %d", sum.ResumeFrom)
	case sum.ResumeFrom != 0:
		return fmt.Errorf("%w (resume with --from-seq %d)", err, sum.ResumeFrom)
	}
	return err
}
