package dlq

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
)

// WriteList prints one line per dead letter.
func WriteList(w io.Writer, letters []Letter) {
	if len(letters) == 0 {
		fmt.Fprintln(w, "no dead letters")
		return
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tTIME\tORIGIN\tCLIENT\tSUB\tSCOPE\tDIGEST\tREASON")
	for _, l := range letters {
		k, _ := l.Key()
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.Seq, l.Time.UTC().Format(time.RFC3339),
			printable(fmt.Sprintf("%s#%d", l.OriginSubject, l.OriginSeq), 60),
			orDash(printable(k.ClientID, 24)), orDash(printable(k.Subject, 24)), orDash(printable(k.Scope, 24)),
			orDash(k.Digest), printable(l.Reason, 80))
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "%d dead letters\n", len(letters))
}

// WriteLetter prints a dead letter's headers and its body, pretty-printed
// when it is a JSON object.
func WriteLetter(w io.Writer, l *Letter) {
	fmt.Fprintf(w, "sequence  %d\ntime      %s\n\nheaders:\n", l.Seq, l.Time.UTC().Format(time.RFC3339Nano))
	names := make([]string, 0, len(l.Header))
	for n := range l.Header {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		for _, v := range l.Header[n] {
			fmt.Fprintf(w, "  %s: %s\n", n, printable(v, 1024))
		}
	}
	fmt.Fprintf(w, "\nbody (%d bytes):\n", len(l.Data))
	fmt.Fprintln(w, prettyBody(l.Data))
}

// knownFields are the fields of a TokenIssued event; a body's other fields
// are named but their values withheld, since nothing says what they hold.
var knownFields = map[string]bool{
	"v": true, "type": true, "token_digest": true, "refresh_digest": true, "client_id": true, "sub": true,
	"scopes": true, "grant_type": true, "issued_at": true, "expires_at": true, "instance": true,
}

func prettyBody(data []byte) string {
	var obj map[string]any
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&obj); err != nil || obj == nil {
		const preview = 256
		s := fmt.Sprintf("  (not a JSON object) %q", data[:min(len(data), preview)])
		if len(data) > preview {
			s += "..."
		}
		return s
	}
	for k, v := range obj {
		switch {
		case k == "token_digest" || k == "refresh_digest":
			if d := shortDigest(v); d != "" {
				obj[k] = d + "..."
			} else if v != nil {
				obj[k] = "(not a hex digest; withheld)"
			}
		case !knownFields[k]:
			obj[k] = "(unknown field; value withheld)"
		}
	}
	out, err := json.MarshalIndent(obj, "  ", "  ")
	if err != nil {
		return "  (unprintable)"
	}
	lines := strings.Split(string(out), "\n")
	for i, line := range lines {
		lines[i] = printable(line, 2048)
	}
	return "  " + strings.Join(lines, "\n")
}

// WriteReport prints what Replay did.
func WriteReport(w io.Writer, r *Report) {
	persisted, left := 0, 0
	for _, o := range r.Outcomes {
		switch {
		case o.Persisted && o.Removed:
			persisted++
			fmt.Fprintf(w, "%d: persisted, dead letter removed\n", o.Seq)
		case o.Persisted:
			persisted++
			fmt.Fprintf(w, "%d: persisted%s\n", o.Seq, prefixed("; ", o.Detail))
		default:
			left++
			fmt.Fprintf(w, "%d: left in place: %s\n", o.Seq, printable(o.Detail, 300))
		}
	}
	fmt.Fprintf(w, "%d persisted (inserted %d, already present %d, conflicts resolved %d, deactivated %d), %d left\n",
		persisted, r.Written.Inserted, r.Written.Present, r.Written.Resolved, r.Written.Deactivated, left)
}

func prefixed(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printable keeps a poison message's text from driving the terminal:
// control characters become '?', and long values are cut.
func printable(s string, limit int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, s)
	if r := []rune(s); len(r) > limit {
		return string(r[:limit]) + "..."
	}
	return s
}
