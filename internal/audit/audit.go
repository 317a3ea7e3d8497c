// Package audit checks the pipeline's promises against the database and the
// stream, independently of the code that keeps them: every token a client
// received has exactly one row, no key has two ACTIVE rows, every ACTIVE row
// is its key's newest token, and nothing is left pending.
package audit

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Report lists every violation found. The zero Report is clean.
type Report struct {
	Tokens          int             // digests checked
	Missing         []events.Digest // issued, no row
	Duplicated      []events.Digest // more than one row
	DoubleActive    []string        // keys with more than one ACTIVE row
	ActiveNotNewest []string        // keys whose ACTIVE row is not the highest stream sequence
	Pending         map[string]uint64
}

// Clean reports whether no promise was broken.
func (r *Report) Clean() bool {
	pending := uint64(0)
	for _, n := range r.Pending {
		pending += n
	}
	return len(r.Missing) == 0 && len(r.Duplicated) == 0 && len(r.DoubleActive) == 0 &&
		len(r.ActiveNotNewest) == 0 && pending == 0
}

// Write prints the report for people.
func (r *Report) Write(w io.Writer) {
	fmt.Fprintf(w, "tokens checked:            %d\n", r.Tokens)
	fmt.Fprintf(w, "missing rows:              %d%s\n", len(r.Missing), sample(r.Missing))
	fmt.Fprintf(w, "duplicated rows:           %d%s\n", len(r.Duplicated), sample(r.Duplicated))
	fmt.Fprintf(w, "keys with 2+ ACTIVE rows:  %d\n", len(r.DoubleActive))
	fmt.Fprintf(w, "ACTIVE row not the newest: %d\n", len(r.ActiveNotNewest))
	for name, n := range r.Pending {
		fmt.Fprintf(w, "pending on %-14s %d\n", name+":", n)
	}
	if r.Clean() {
		fmt.Fprintln(w, "result: clean")
	} else {
		fmt.Fprintln(w, "result: VIOLATIONS")
	}
}

func sample(ds []events.Digest) string {
	if len(ds) == 0 {
		return ""
	}
	var parts []string
	for _, d := range ds[:min(3, len(ds))] {
		parts = append(parts, d.String()[:12])
	}
	return " (e.g. " + strings.Join(parts, ", ") + ")"
}

// ReadDigests reads one hex token digest per line; blank lines and lines
// starting with # are skipped.
func ReadDigests(r io.Reader) ([]events.Digest, error) {
	var out []events.Digest
	sc := bufio.NewScanner(r)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		d, err := events.ParseDigest(s)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, d)
	}
	return out, sc.Err()
}

// Check audits the given digests (may be empty: then only the table-wide
// checks run) and, if stream is not nil, the named consumers' backlog.
func Check(ctx context.Context, pool *pgxpool.Pool, digests []events.Digest, stream jetstream.Stream, consumers ...string) (*Report, error) {
	// A coalesced token is handed to several requests; it is still one
	// token with one row.
	digests = slices.Clone(digests)
	slices.SortFunc(digests, func(a, b events.Digest) int { return bytes.Compare(a[:], b[:]) })
	digests = slices.Compact(digests)
	r := &Report{Tokens: len(digests), Pending: map[string]uint64{}}
	const chunk = 10000
	for lo := 0; lo < len(digests); lo += chunk {
		part := digests[lo:min(lo+chunk, len(digests))]
		counts, err := store.RowCounts(ctx, pool, part)
		if err != nil {
			return nil, fmt.Errorf("audit rows per token: %w", err)
		}
		// In digest order (the statement has none).
		for _, d := range part {
			n, odd := counts[d]
			switch {
			case !odd:
			case n == 0:
				r.Missing = append(r.Missing, d)
			default:
				r.Duplicated = append(r.Duplicated, d)
			}
		}
	}
	var err error
	if r.DoubleActive, err = store.DoubleActiveKeys(ctx, pool); err != nil {
		return nil, fmt.Errorf("audit keys: %w", err)
	}
	if r.ActiveNotNewest, err = store.ActiveNotNewestKeys(ctx, pool); err != nil {
		return nil, fmt.Errorf("audit keys: %w", err)
	}
	if stream != nil {
		for _, name := range consumers {
			c, err := stream.Consumer(ctx, name)
			if err != nil {
				return nil, fmt.Errorf("audit consumer %s: %w", name, err)
			}
			info, err := c.Info(ctx)
			if err != nil {
				return nil, fmt.Errorf("audit consumer %s: %w", name, err)
			}
			r.Pending[name] = info.NumPending + uint64(info.NumAckPending)
		}
	}
	return r, nil
}
