package loadgen

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"
)

// WriteSummary prints the human summary table.
func (r *Report) WriteSummary(w io.Writer) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "offered/s\tachieved/s\tsent\tok\thttp p50 ms\tp90\tp99\tp99.9\tmax\tpersist lag p50\tp99\tunpersisted\theld\t")
	for _, s := range r.Steps {
		fmt.Fprintf(tw, "%.0f\t%.0f\t%d\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%d\t%v\t\n",
			s.OfferedRate, s.AchievedRate, s.Sent, s.OK, s.HTTP.P50, s.HTTP.P90, s.HTTP.P99, s.HTTP.P999, s.HTTP.Max,
			s.Lag.P50.Round(time.Millisecond), s.Lag.P99.Round(time.Millisecond), s.Lag.Unpersisted, s.Held)
	}
	_ = tw.Flush()
	errs := map[string]int{}
	for _, s := range r.Steps {
		for k, v := range s.Errors {
			errs[k] += v
		}
	}
	if len(errs) > 0 {
		fmt.Fprintf(w, "errors by kind: %v\n", errs)
	}
	if r.HighestSustained > 0 {
		fmt.Fprintf(w, "highest sustained rate: %.0f tokens/s\n", r.HighestSustained)
	}
	var peak uint64
	for _, q := range r.Queue {
		peak = max(peak, q.Lag())
	}
	fmt.Fprintf(w, "queue lag peak: %d messages; drained %s after the load stopped\n", peak, r.DrainTime.Round(time.Millisecond))
	fmt.Fprintf(w, "recovery: %d tokens made INACTIVE by a newer token of their key\n", r.Inactive)
	if r.Audit != nil {
		fmt.Fprintln(w, "verification:")
		r.Audit.Write(w)
	}
	if r.ClientVisible != nil {
		fmt.Fprintln(w, "what clients saw:")
		r.ClientVisible.Write(w)
	}
}

// WriteJSON writes the whole report.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteCSV writes the per-second series: offered and achieved rate, HTTP
// p50 and p99, queue lag (the last sample within each second) and the
// issue-to-persisted lag p50 and p99 of the answers of that second (empty
// when none was measured).
func (r *Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"unix_second", "offered", "achieved", "errors", "http_p50_ms", "http_p99_ms", "queue_lag", "persist_lag_p50_ms", "persist_lag_p99_ms"})
	lag := map[int64]LagSecond{}
	for _, l := range r.LagSeconds {
		lag[l.At.Unix()] = l
	}
	ms := func(d time.Duration) string {
		return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64)
	}
	for _, s := range r.Seconds {
		p50, p99 := "", ""
		if l, ok := lag[s.At.Unix()]; ok {
			p50, p99 = ms(l.P50), ms(l.P99)
		}
		_ = cw.Write([]string{
			strconv.FormatInt(s.At.Unix(), 10), strconv.Itoa(s.Offered), strconv.Itoa(s.Achieved), strconv.Itoa(s.Errors),
			strconv.FormatFloat(s.P50Millis, 'f', 2, 64), strconv.FormatFloat(s.P99Millis, 'f', 2, 64),
			strconv.FormatUint(r.lagAt(s.At), 10), p50, p99,
		})
	}
	cw.Flush()
	return cw.Error()
}

// lagAt is the queue lag of the last sample taken in the second starting at t.
func (r *Report) lagAt(t time.Time) uint64 {
	var lag uint64
	for _, q := range r.Queue {
		if !q.At.Before(t) && q.At.Before(t.Add(time.Second)) {
			lag = q.Lag()
		}
	}
	return lag
}
