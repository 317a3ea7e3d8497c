package app

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/dlq"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

const dlqUsage = `list|show|replay|purge ...

Dead letters are copies of poison messages (events that can never be
persisted) with the reason and the origin subject and sequence of each. Only
the first 12 hex characters of a token digest are ever printed.

  list [--json]        every dead letter: sequence, time, origin, key, reason
  show SEQ             one dead letter's headers and body
  replay SEQ...|--all [--keep]
                       decode each again (after a fix) and persist those that
                       now decode, with their ORIGINAL stream sequence, through
                       the persister's and recovery's logic; persisted ones are
                       removed (kept with --keep), the rest are left
  purge [--yes]        delete every dead letter, and nothing else; asks first
                       unless --yes

Examples:
  tokenpipe dlq list
  tokenpipe dlq show 48213
  tokenpipe dlq replay 48213 48250
  tokenpipe dlq replay --all
  tokenpipe dlq purge --yes`

func RunDLQ(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var cfg Common
	rest, err := LoadConfig("dlq", args, stderr, &cfg, dlqUsage)
	if err != nil {
		return HelpIsNil(err)
	}
	if len(rest) == 0 {
		fmt.Fprintln(stderr, "usage: tokenpipe dlq "+dlqUsage)
		return ErrUsage
	}
	sub, rest := rest[0], rest[1:]
	fs := flag.NewFlagSet("dlq "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tokenpipe dlq "+dlqUsage)
		fmt.Fprintln(stderr, "\nFlags of dlq "+sub+":")
		fs.PrintDefaults()
	}
	var (
		asJSON, all, keep, yes *bool
	)
	switch sub {
	case "list":
		asJSON = fs.Bool("json", false, "print JSON")
	case "show":
	case "replay":
		all = fs.Bool("all", false, "replay every dead letter")
		keep = fs.Bool("keep", false, "keep dead letters that were persisted")
	case "purge":
		yes = fs.Bool("yes", false, "do not ask for confirmation")
	default:
		fmt.Fprintf(stderr, "dlq: unknown subcommand %q\nusage: tokenpipe dlq %s\n", sub, dlqUsage)
		return ErrUsage
	}
	pos, err := parseInterleaved(fs, rest)
	if err != nil {
		return HelpIsNil(FlagErr(err))
	}
	seqs, err := parseSeqs(pos)
	if err != nil {
		fmt.Fprintf(stderr, "dlq %s: %v\n", sub, err)
		return ErrUsage
	}
	switch {
	case sub == "show" && len(seqs) != 1:
		fmt.Fprintln(stderr, "usage: tokenpipe dlq show SEQ")
		return ErrUsage
	case sub == "replay" && (len(seqs) == 0) == !*all:
		fmt.Fprintln(stderr, "usage: tokenpipe dlq replay SEQ...|--all [--keep]")
		return ErrUsage
	case (sub == "list" || sub == "purge") && len(seqs) > 0:
		fmt.Fprintf(stderr, "usage: tokenpipe dlq %s takes no sequences\n", sub)
		return ErrUsage
	}

	nc, js, err := ConnectNATS(&cfg, "tokenpipe-dlq", NewLogger(&cfg, stderr).With("role", "dlq"), nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	topo := cfg.Topology()
	switch sub {
	case "list":
		letters, err := dlq.List(ctx, js, topo)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeLettersJSON(stdout, letters)
		}
		dlq.WriteList(stdout, letters)
		return nil
	case "show":
		l, err := dlq.Get(ctx, js, topo, seqs[0])
		if err != nil {
			return err
		}
		dlq.WriteLetter(stdout, l)
		return nil
	case "replay":
		return dlqReplay(ctx, &cfg, js, seqs, *keep, stdout, stderr)
	default:
		return dlqPurge(ctx, &cfg, js, *yes, stdout, stderr)
	}
}

func parseSeqs(args []string) ([]uint64, error) {
	out := make([]uint64, 0, len(args))
	for _, a := range args {
		n, err := strconv.ParseUint(a, 10, 64)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a stream sequence", a)
		}
		out = append(out, n)
	}
	return out, nil
}

// writeLettersJSON prints the letters with their key fields; bodies are left
// out, as in the table.
func writeLettersJSON(w io.Writer, letters []dlq.Letter) error {
	type row struct {
		dlq.Letter
		Key *dlq.Key `json:"key,omitempty"`
	}
	rows := make([]row, len(letters))
	for i, l := range letters {
		rows[i].Letter = l
		if k, ok := l.Key(); ok {
			rows[i].Key = &k
		}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rows)
}

func dlqReplay(ctx context.Context, cfg *Common, js jetstream.JetStream, seqs []uint64, keep bool, stdout, stderr io.Writer) error {
	topo := cfg.Topology()
	var letters []dlq.Letter
	if len(seqs) == 0 {
		all, err := dlq.List(ctx, js, topo)
		if err != nil {
			return err
		}
		letters = all
	}
	for _, s := range seqs {
		l, err := dlq.Get(ctx, js, topo, s)
		if err != nil {
			return err
		}
		letters = append(letters, *l)
	}
	if len(letters) == 0 {
		fmt.Fprintln(stdout, "no dead letters")
		return nil
	}
	pool, err := ConnectPostgres(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	w := &replay.Writer{DB: pool, JS: js, Topology: topo, Retry: store.DefaultRetryPolicy(), Log: NewLogger(cfg, stderr).With("role", "dlq")}
	rep, err := dlq.Replay(ctx, w, letters, keep)
	if rep == nil {
		return err
	}
	dlq.WriteReport(stdout, rep)
	if err != nil {
		return err
	}
	// Exit non-zero while dead letters remain, so a script notices.
	left := 0
	for _, o := range rep.Outcomes {
		if !o.Persisted {
			left++
		}
	}
	if left > 0 {
		return fmt.Errorf("%d of %d dead letters left in place", left, len(letters))
	}
	return nil
}

func dlqPurge(ctx context.Context, cfg *Common, js jetstream.JetStream, yes bool, stdout, stderr io.Writer) error {
	topo := cfg.Topology()
	n, err := dlq.Count(ctx, js, topo)
	if err != nil {
		return err
	}
	if n == 0 {
		fmt.Fprintln(stdout, "no dead letters")
		return nil
	}
	if !yes {
		// Only a person at a terminal can answer; a script must say --yes.
		if !IsTerminal(os.Stdin) || !IsTerminal(stderr) {
			return errors.New("not purging without confirmation: run it at a terminal or pass --yes")
		}
		fmt.Fprintf(stderr, "Purge %d dead letters (subject %s) from stream %s? They cannot be recovered. Type yes: ", n, topo.DeadSubject(), topo.Stream)
		answer, err := bufio.NewReader(os.Stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read answer: %w", err)
		}
		if strings.TrimSpace(answer) != "yes" {
			fmt.Fprintln(stderr, "not purged")
			return nil
		}
	}
	purged, err := dlq.Purge(ctx, js, topo)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "purged %d dead letters from %s\n", purged, topo.DeadSubject())
	return nil
}
