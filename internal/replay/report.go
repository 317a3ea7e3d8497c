package replay

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// ParseTime reads a --since or --until value: an RFC 3339 time, or a
// duration back from now ("2h", "90m", "3d").
func ParseTime(s string, now time.Time) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 0 {
			return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time nor a duration like 2h or 3d", s)
		}
		return now.Add(-time.Duration(n) * 24 * time.Hour), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time nor a duration like 2h or 3d", s)
	}
	return now.Add(-d), nil
}

// ProgressPrinter returns a Progress function for w. On a terminal it
// rewrites one line in place on every call; elsewhere (logs, CI) it writes a
// plain line at most every `every`, so a long replay does not flood them.
func ProgressPrinter(w io.Writer, terminal bool, every time.Duration) func(Progress) {
	var last time.Time
	return func(p Progress) {
		line := progressLine(p)
		switch {
		case terminal && p.Final:
			fmt.Fprintf(w, "\r%s\n", line)
		case terminal:
			fmt.Fprintf(w, "\r%s", line)
		case p.Final || time.Since(last) >= every:
			last = time.Now()
			fmt.Fprintln(w, line)
		}
	}
}

func progressLine(p Progress) string {
	total := "?"
	if p.Total > 0 {
		total = strconv.FormatInt(p.Total, 10)
	}
	pct := ""
	if p.Total > 0 {
		pct = fmt.Sprintf(" (%5.1f%%)", 100*float64(p.Done)/float64(p.Total))
	}
	eta := "-"
	if d := p.ETA(); d > 0 && !p.Final {
		eta = d.Round(time.Second).String()
	}
	return fmt.Sprintf("replay %d/%s%s  %8.0f events/s  seq %d  elapsed %s  ETA %s   ",
		p.Done, total, pct, p.Rate(), p.LastSeq, p.Elapsed.Round(100*time.Millisecond), eta)
}

// Write prints the summary for people.
func (s *Summary) Write(w io.Writer) {
	verb := "replayed"
	if s.DryRun {
		verb = "dry run of"
	}
	rng := "nothing in range"
	if s.Processed > 0 {
		rng = fmt.Sprintf("sequences %d-%d", s.FirstSeq, s.LastSeq)
	}
	fmt.Fprintf(w, "%s %s: %d messages, %s, in %s (%.0f events/s)\n", verb, s.Subject, s.Processed, rng,
		s.Elapsed.Round(time.Millisecond), float64(s.Processed)/max(s.Elapsed.Seconds(), 1e-9))
	if s.DryRun {
		fmt.Fprintf(w, "  would insert        %d\n", s.Inserted)
		fmt.Fprintf(w, "  already present     %d\n", s.Present)
		fmt.Fprintf(w, "  poison (not copied) %d\n", s.Poison)
	} else {
		fmt.Fprintf(w, "  inserted            %d\n", s.Inserted)
		fmt.Fprintf(w, "  already present     %d\n", s.Present)
		fmt.Fprintf(w, "  conflicts resolved  %d (older ACTIVE tokens deactivated: %d)\n", s.Resolved, s.Deactivated)
		fmt.Fprintf(w, "  dead-lettered       %d new (poison found: %d)\n", s.DeadLettered, s.Poison)
	}
	if s.Skipped > 0 {
		fmt.Fprintf(w, "  skipped             %d (not TokenIssued events)\n", s.Skipped)
	}
	if s.Interrupted {
		fmt.Fprintf(w, "  INTERRUPTED: resume with --from-seq %d\n", s.ResumeFrom)
	} else if s.ResumeFrom != 0 {
		fmt.Fprintf(w, "  FAILED: after fixing the cause, resume with --from-seq %d\n", s.ResumeFrom)
	}
}

// WindowWarning explains when the requested start lies before the oldest
// event the stream still holds, and returns "" otherwise.
func (s *Summary) WindowWarning(o Options) string {
	// FirstSeq 1 means nothing was ever removed from the front: a start
	// before the stream's first event lost nothing.
	if s.StreamFirstSeq <= 1 {
		return ""
	}
	switch {
	case o.FromSeq != 0 && o.FromSeq < s.StreamFirstSeq:
		return fmt.Sprintf("warning: sequences %d-%d have aged out of the stream (retention); the replay starts at %d", o.FromSeq, s.StreamFirstSeq-1, s.StreamFirstSeq)
	case !o.Since.IsZero() && o.Since.Before(s.StreamFirstTime):
		return fmt.Sprintf("warning: events before %s have aged out of the stream (retention); the replay starts there", s.StreamFirstTime.UTC().Format(time.RFC3339))
	}
	return ""
}
