package loadgen

import (
	"fmt"
	"html"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The chart is inline SVG without scripts: it opens offline in any browser,
// stays a few tens of kilobytes, and its layout (ticks, legends, step
// marks) is plain Go that tests can check. A JavaScript charting library
// would have to be shipped inside every page to work offline.

// Chart geometry, in SVG pixels: each panel is chartW x panelH with the
// plot area inset by the margins; the legend row sits between the title and
// the plot, never over the lines.
const (
	chartW, panelH                     = 1000.0, 270.0
	marginL, marginR, marginT, marginB = 80.0, 24.0, 62.0, 38.0
)

// line is one series of a panel; a gap of more than gapAfter seconds
// between points breaks it (no line is drawn across time without data).
type line struct {
	name, color string
	dashed      bool
	xs, ys      []float64
}

const gapAfter = 1.5

const boundColor = "#ff7f0e"

// panelSpec is one chart: its series share the y axis.
type panelSpec struct {
	title, unit string
	lines       []line
	bound       float64 // a horizontal reference line (the ramp's lag bound), 0 for none
	boundLabel  string
	stepLabels  bool // write each step's rate and verdict in its band
}

// stepBand is a ramp step on the time axis.
type stepBand struct {
	from, to float64 // seconds since the start
	rate     float64
	judged   bool // a ramp step: held or failed; a constant run is not judged
	held     bool
}

// WriteHTML writes a self-contained page (inline SVG, no scripts): offered
// and achieved rate and failed requests, HTTP p50/p99, issue-to-persisted
// lag p50/p99 by second (with the ramp's bound), and queue lag, on one time
// axis, with each ramp step shaded by its verdict.
func (r *Report) WriteHTML(w io.Writer) error {
	var b strings.Builder
	b.WriteString(`<!doctype html><html><head><meta charset="utf-8"><title>tokenpipe load test</title>
<style>body{font:14px sans-serif;margin:1.5em;color:#222}h1{font-size:18px;margin:0 0 .3em}p{margin:0 0 1em;color:#555}svg{display:block;margin-bottom:1em}</style></head><body>`)
	fmt.Fprintf(&b, "<h1>tokenpipe load test, %s</h1>", html.EscapeString(r.Started.UTC().Format(time.RFC3339)))
	b.WriteString("<p>" + html.EscapeString(r.caption()) + "</p>")
	panels, bands, xmax := r.panels()
	for _, p := range panels {
		b.WriteString(p.svg(xmax, bands))
	}
	b.WriteString("</body></html>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// panels turns the report into the four charts, the ramp's step bands and
// the end of the time axis (seconds since the start).
func (r *Report) panels() ([]panelSpec, []stepBand, float64) {
	at := func(t time.Time) float64 { return max(0, t.Sub(r.Started).Seconds()) }
	// A second's figures are drawn in the middle of the part after the start.
	mid := func(t time.Time) float64 { return (at(t) + at(t.Add(time.Second))) / 2 }
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	var bands []stepBand
	xmax := 1.0
	for _, s := range r.Steps {
		b := stepBand{from: at(s.Started), to: at(s.Ended), rate: s.OfferedRate, judged: r.LagBound > 0, held: s.Held}
		bands = append(bands, b)
		xmax = max(xmax, b.to)
	}
	offered := line{name: "offered", color: "#7f7f7f", dashed: true}
	achieved := line{name: "achieved (200 answers)", color: "#1f77b4"}
	failed := line{name: "failed or dropped", color: "#8c564b"}
	h50, h99 := line{name: "p50", color: "#2ca02c"}, line{name: "p99", color: "#d62728"}
	for _, p := range r.secondPoints() {
		x := mid(p.at)
		if p.sending {
			offered.add(x, p.offered)
		}
		achieved.add(x, p.achieved)
		failed.add(x, p.errors)
		if p.achieved > 0 {
			h50.add(x, p.p50)
			h99.add(x, p.p99)
		}
	}
	l50, l99 := line{name: "p50", color: "#2ca02c"}, line{name: "p99", color: "#d62728"}
	for _, l := range r.LagSeconds {
		l50.add(mid(l.At), ms(l.P50))
		l99.add(mid(l.At), ms(l.P99))
	}
	queue := line{name: "pending + ack pending, both consumers (gaps: no sample answered)", color: "#9467bd"}
	for _, q := range r.Queue {
		queue.add(at(q.At), float64(q.Lag()))
		xmax = max(xmax, at(q.At))
	}
	lagPanel := panelSpec{title: "Issue-to-persisted lag, by the second the answer arrived", unit: "ms", lines: []line{l50, l99}}
	if r.LagBound > 0 {
		lagPanel.bound, lagPanel.boundLabel = ms(r.LagBound), "step bound: p99 <= "+r.LagBound.String()
	}
	return []panelSpec{
		{title: "Requests per second", unit: "per second", lines: []line{offered, achieved, failed}, stepLabels: true},
		{title: "HTTP latency, from each request's scheduled send time", unit: "ms", lines: []line{h50, h99}},
		lagPanel,
		{title: "Queue lag (sampled every 250 ms)", unit: "messages", lines: []line{queue}},
	}, bands, xmax
}

// secondPoint is one wall-clock second of the run, as rates.
type secondPoint struct {
	at                        time.Time
	offered, achieved, errors float64 // per second
	sending                   bool    // offered is known: requests were due in this second
	p50, p99                  float64 // ms
}

// secondPoints merges the steps' seconds into one series of rates. A
// second a step covers only in part (its first and last, and the second
// two steps share) is divided by the time the steps covered of it (sending
// for the offered rate, sending or waiting for answers for the rest), so a
// partial second does not look like a drop; one covered less than half is
// left out (a burst of late answers in its sliver would look like a rate). Latency is that of the step with more answers in it.
func (r *Report) secondPoints() []secondPoint {
	var out []secondPoint
	index := map[int64]int{}
	for _, s := range r.Seconds {
		i, ok := index[s.At.Unix()]
		if !ok {
			i = len(out)
			index[s.At.Unix()] = i
			out = append(out, secondPoint{at: s.At})
		}
		p := &out[i]
		if float64(s.Achieved) > p.achieved {
			p.p50, p.p99 = s.P50Millis, s.P99Millis
		}
		p.offered += float64(s.Offered)
		p.achieved += float64(s.Achieved)
		p.errors += float64(s.Errors)
	}
	kept := out[:0]
	for _, p := range out {
		sent, answered := r.covered(p.at)
		if answered < 0.5 {
			continue
		}
		p.achieved, p.errors = p.achieved/answered, p.errors/answered
		// Answers still arrive after the sending stopped: no offered
		// rate for a second mostly past the sending.
		p.sending = sent >= 0.5
		if p.sending {
			p.offered /= sent
		}
		kept = append(kept, p)
	}
	return kept
}

// covered is how much of the second from t the steps were sending in, and
// how much they were receiving answers in (sending, then waiting for the
// last answers); a report without steps covers every second whole.
func (r *Report) covered(t time.Time) (sent, answered float64) {
	if len(r.Steps) == 0 {
		return 1, 1
	}
	for _, st := range r.Steps {
		sent += overlap(t, t.Add(time.Second), st.Started, st.Started.Add(st.Duration)).Seconds()
		answered += overlap(t, t.Add(time.Second), st.Started, st.Ended).Seconds()
	}
	return sent, answered
}

// overlap is how long [a0, a1) and [b0, b1) share.
func overlap(a0, a1, b0, b1 time.Time) time.Duration {
	from, to := a0, a1
	if b0.After(from) {
		from = b0
	}
	if b1.Before(to) {
		to = b1
	}
	return max(0, to.Sub(from))
}

func (l *line) add(x, y float64) { l.xs, l.ys = append(l.xs, x), append(l.ys, y) }

// caption says what the shading means and what the run found.
func (r *Report) caption() string {
	if r.LagBound == 0 {
		return fmt.Sprintf("Constant rate, %d step(s).", len(r.Steps))
	}
	s := fmt.Sprintf("Ramp: each band is one step, green if it held (p99 issue-to-persisted lag <= %s, errors within bound, achieved >= 95%% of offered, every token persisted), red if not.", r.LagBound)
	for _, st := range r.Steps {
		if len(st.Failures) > 0 {
			s += fmt.Sprintf(" Step %s/s failed: %s.", formatTick(st.OfferedRate, 1), strings.Join(st.Failures, "; "))
		}
	}
	if r.HighestSustained > 0 {
		s += fmt.Sprintf(" Highest sustained rate: %s tokens/s.", formatTick(r.HighestSustained, 1))
	}
	return s
}

// svg draws the panel: bands, grid and ticks, lines, legend, title.
func (p panelSpec) svg(xmax float64, bands []stepBand) string {
	ymax := p.bound * 1.15
	for _, l := range p.lines {
		for _, y := range l.ys {
			ymax = max(ymax, y)
		}
	}
	yt := niceTicks(ymax, 5)
	var xt []float64 // the time axis ends with the data, ticked within it
	for _, v := range niceTicks(xmax, 10) {
		if v <= xmax+1e-9 {
			xt = append(xt, v)
		}
	}
	pl := plot{xmax: xmax, ymax: yt[len(yt)-1]}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">`, chartW, panelH, chartW, panelH)
	fmt.Fprintf(&b, `<text x="%.0f" y="18" font-size="14" font-weight="bold">%s</text>`, marginL, html.EscapeString(p.title))
	for _, band := range bands {
		b.WriteString(pl.band(band, p.stepLabels))
	}
	b.WriteString(pl.axes(xt, yt, p.unit))
	keys := p.lines
	if p.bound > 0 {
		// Named in the legend row, not beside the line, where the series
		// could cross the label.
		y := pl.y(p.bound)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="5 3"/>`, marginL, y, chartW-marginR, y, boundColor)
		keys = append(slices.Clone(keys), line{name: p.boundLabel, color: boundColor, dashed: true})
	}
	for _, l := range p.lines {
		b.WriteString(pl.polylines(l))
	}
	b.WriteString(legend(keys))
	b.WriteString("</svg>")
	return b.String()
}

// plot maps data to the plot area of a panel.
type plot struct{ xmax, ymax float64 }

func (p plot) x(v float64) float64 { return marginL + v/p.xmax*(chartW-marginL-marginR) }
func (p plot) y(v float64) float64 { return panelH - marginB - v/p.ymax*(panelH-marginT-marginB) }

// axes draws the grid, the ticks and their labels, and the axis titles.
func (p plot) axes(xt, yt []float64, unit string) string {
	var b strings.Builder
	top, bottom := marginT, panelH-marginB
	for _, v := range yt {
		y := p.y(v)
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#e6e6e6"/>`, marginL, y, chartW-marginR, y)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" font-size="11" text-anchor="end" fill="#444">%s</text>`, marginL-6, y+4, formatTick(v, yt[1]-yt[0]))
	}
	for _, v := range xt {
		x := p.x(v)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#888"/>`, x, bottom, x, bottom+4)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" font-size="11" text-anchor="middle" fill="#444">%s s</text>`, x, bottom+16, formatTick(v, xt[1]-xt[0]))
	}
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#444"/>`, marginL, bottom, chartW-marginR, bottom)
	fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="#444"/>`, marginL, top, marginL, bottom)
	mid := (top + bottom) / 2
	fmt.Fprintf(&b, `<text x="16" y="%.0f" font-size="11" text-anchor="middle" transform="rotate(-90 16 %.0f)">%s</text>`, mid, mid, html.EscapeString(unit))
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="11" text-anchor="end" fill="#444">time since the start</text>`, chartW-marginR, panelH-4)
	return b.String()
}

// band shades one step by its verdict and marks its edges; with labels,
// it writes the step's offered rate and verdict at its top.
func (p plot) band(s stepBand, labels bool) string {
	fill, word, color := "#f2f2f2", "", "#555"
	if s.judged && s.held {
		fill, word, color = "#e3f4e1", "held", "#1e7b1e"
	} else if s.judged {
		fill, word, color = "#fbe3e1", "failed", "#b22222"
	}
	x0, x1 := p.x(s.from), p.x(s.to)
	top, bottom := marginT, panelH-marginB
	var b strings.Builder
	fmt.Fprintf(&b, `<rect x="%.1f" y="%.0f" width="%.1f" height="%.0f" fill="%s"/>`, x0, top, max(0, x1-x0), bottom-top, fill)
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#bbb" stroke-dasharray="3 3"/>`, x0, top, x0, bottom)
	if labels && s.judged {
		cx := (x0 + x1) / 2
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" font-size="10" text-anchor="middle" fill="%s">%s/s</text>`, cx, top+12, color, formatTick(s.rate, 1))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" font-size="10" text-anchor="middle" fill="%s" font-weight="bold">%s</text>`, cx, top+24, color, word)
	}
	return b.String()
}

// polylines draws a series, broken where it has no data.
func (p plot) polylines(l line) string {
	var b strings.Builder
	dash := ""
	if l.dashed {
		dash = ` stroke-dasharray="5 3"`
	}
	var pts []string
	flush := func() {
		if len(pts) > 0 {
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.6"%s points="%s"/>`, l.color, dash, strings.Join(pts, " "))
		}
		pts = nil
	}
	for i := range l.xs {
		if i > 0 && l.xs[i]-l.xs[i-1] > gapAfter {
			flush()
		}
		pts = append(pts, fmt.Sprintf("%.1f,%.1f", p.x(l.xs[i]), p.y(l.ys[i])))
	}
	flush()
	return b.String()
}

// legend lays the series' names out in one row above the plot area.
func legend(lines []line) string {
	var b strings.Builder
	x := marginL
	const y = 40.0
	for _, l := range lines {
		dash := ""
		if l.dashed {
			dash = ` stroke-dasharray="5 3"`
		}
		fmt.Fprintf(&b, `<line x1="%.0f" y1="%.0f" x2="%.0f" y2="%.0f" stroke="%s" stroke-width="2.5"%s/>`, x, y-4, x+22, y-4, l.color, dash)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-size="12">%s</text>`, x+28, y, html.EscapeString(l.name))
		x += 28 + textWidth(l.name, 12) + 24
	}
	return b.String()
}

// textWidth estimates the width of s in a sans-serif font of size px
// (about 0.6 em a character), enough to keep legend entries apart.
func textWidth(s string, px float64) float64 { return float64(len([]rune(s))) * px * 0.6 }

// niceTicks returns about n round ticks from 0 to at least v: steps of 1,
// 2, 2.5 or 5 times a power of ten.
func niceTicks(v float64, n int) []float64 {
	if !(v > 0) || math.IsInf(v, 0) {
		v = 1
	}
	raw := v / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := 10 * mag
	for _, m := range []float64{1, 2, 2.5, 5} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	k := math.Ceil(v/step - 1e-9)
	ticks := make([]float64, 0, int(k)+1)
	for i := 0.0; i <= k; i++ {
		ticks = append(ticks, i*step)
	}
	return ticks
}

// formatTick writes v with the decimals its tick step needs and thousands
// separators: 12,000; 2.5; 0.25.
func formatTick(v, step float64) string {
	dec := 0
	for s := step; dec < 6 && math.Abs(s-math.Round(s)) > 1e-9; s *= 10 {
		dec++
	}
	text := strconv.FormatFloat(v, 'f', dec, 64)
	whole, frac, _ := strings.Cut(text, ".")
	neg := strings.HasPrefix(whole, "-")
	whole = strings.TrimPrefix(whole, "-")
	for i := len(whole) - 3; i > 0; i -= 3 {
		whole = whole[:i] + "," + whole[i:]
	}
	if neg {
		whole = "-" + whole
	}
	if frac != "" {
		return whole + "." + frac
	}
	return whole
}
