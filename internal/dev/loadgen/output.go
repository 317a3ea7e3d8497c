package loadgen

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"strconv"
	"strings"
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

// WriteCSV writes the per-second series: offered and achieved rate, HTTP p99
// and queue lag (the last sample within each second).
func (r *Report) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"unix_second", "offered", "achieved", "errors", "http_p99_ms", "queue_lag"})
	for _, s := range r.Seconds {
		_ = cw.Write([]string{
			strconv.FormatInt(s.At.Unix(), 10), strconv.Itoa(s.Offered), strconv.Itoa(s.Achieved),
			strconv.Itoa(s.Errors), strconv.FormatFloat(s.P99Millis, 'f', 2, 64), strconv.FormatUint(r.lagAt(s.At), 10),
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

// series is one line of the chart.
type series struct {
	name, unit, color string
	xs, ys            []float64
}

// WriteHTML writes a self-contained page (inline SVG, no scripts) charting
// offered and achieved rate, HTTP p99 and queue lag against time.
func (r *Report) WriteHTML(w io.Writer) error {
	t0 := r.Started
	var offered, achieved, p99, lag series
	offered = series{name: "offered rate", unit: "req/s", color: "#888"}
	achieved = series{name: "achieved rate", unit: "tokens/s", color: "#1f77b4"}
	p99 = series{name: "HTTP p99", unit: "ms", color: "#d62728"}
	lag = series{name: "queue lag (pending + ack pending)", unit: "messages", color: "#2ca02c"}
	for _, s := range r.Seconds {
		x := max(0, s.At.Sub(t0).Seconds())
		offered.xs, offered.ys = append(offered.xs, x), append(offered.ys, float64(s.Offered))
		achieved.xs, achieved.ys = append(achieved.xs, x), append(achieved.ys, float64(s.Achieved))
		p99.xs, p99.ys = append(p99.xs, x), append(p99.ys, s.P99Millis)
	}
	for _, q := range r.Queue {
		lag.xs, lag.ys = append(lag.xs, q.At.Sub(t0).Seconds()), append(lag.ys, float64(q.Lag()))
	}
	// One time axis for every panel, so a person can line events up.
	xmax := 1.0
	for _, s := range []series{offered, lag} {
		for _, x := range s.xs {
			xmax = math.Max(xmax, x)
		}
	}
	var b strings.Builder
	b.WriteString(`<!doctype html><html><head><meta charset="utf-8"><title>tokenpipe load test</title>
<style>body{font:14px sans-serif;margin:2em}h1{font-size:18px}svg{display:block;margin-bottom:1.5em}</style></head><body>`)
	fmt.Fprintf(&b, "<h1>tokenpipe load test, %s</h1>", html.EscapeString(t0.UTC().Format(time.RFC3339)))
	b.WriteString(panel("Rate", "req/s", xmax, offered, achieved))
	b.WriteString(panel("HTTP latency p99 (from scheduled send time)", "ms", xmax, p99))
	b.WriteString(panel("Queue lag", "messages", xmax, lag))
	b.WriteString("</body></html>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// panel draws one chart with shared axes for its series.
func panel(title, unit string, xmax float64, ss ...series) string {
	const W, H, L, R, T, B = 900.0, 220.0, 70.0, 20.0, 30.0, 40.0
	ymax := 1.0
	for _, s := range ss {
		for _, y := range s.ys {
			ymax = math.Max(ymax, y)
		}
	}
	ymax *= 1.1
	px := func(x float64) float64 { return L + x/xmax*(W-L-R) }
	py := func(y float64) float64 { return H - B - y/ymax*(H-T-B) }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" xmlns="http://www.w3.org/2000/svg">`, W, H, W, H)
	fmt.Fprintf(&b, `<text x="%.0f" y="18" font-weight="bold">%s</text>`, L, html.EscapeString(title))
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#000"/>`, L, H-B, W-R, H-B)
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#000"/>`, L, T, L, H-B)
	for i := 0; i <= 4; i++ {
		y := ymax * float64(i) / 4
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="11" text-anchor="end">%s</text>`, L-5, py(y)+4, short(y))
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#eee"/>`, L, py(y), W-R, py(y))
		x := xmax * float64(i) / 4
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" font-size="11" text-anchor="middle">%.0fs</text>`, px(x), H-B+16, x)
	}
	fmt.Fprintf(&b, `<text x="12" y="%.0f" font-size="11" transform="rotate(-90 12 %.0f)">%s</text>`, H/2, H/2, html.EscapeString(unit))
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="11" text-anchor="middle">time since start</text>`, (W+L)/2, H-6)
	for i, s := range ss {
		var pts []string
		for j := range s.xs {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s.xs[j]), py(s.ys[j])))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`, s.color, strings.Join(pts, " "))
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="12" fill="%s">%s (%s)</text>`, W-R-330, T+14*float64(i+1), s.color, html.EscapeString(s.name), html.EscapeString(s.unit))
	}
	b.WriteString("</svg>")
	return b.String()
}

func short(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.1fM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0fk", v/1e3)
	case v >= 10:
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.2f", v)
}
