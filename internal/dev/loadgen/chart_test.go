package loadgen

import (
	"bytes"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNiceTicks(t *testing.T) {
	for _, c := range []struct {
		v    float64
		n    int
		want []float64
	}{
		// The old chart's ticks were 1,650 / 3,300 / 4,950 for this range.
		{6600, 5, []float64{0, 2000, 4000, 6000, 8000}},
		{287.5, 5, []float64{0, 100, 200, 300}},
		{12, 5, []float64{0, 2.5, 5, 7.5, 10, 12.5}},
		{1, 5, []float64{0, 0.2, 0.4, 0.6000000000000001, 0.8, 1}},
		{0, 5, []float64{0, 0.2, 0.4, 0.6000000000000001, 0.8, 1}}, // no data: a unit axis
		{37.2, 10, []float64{0, 5, 10, 15, 20, 25, 30, 35, 40}},
	} {
		if got := niceTicks(c.v, c.n); !slices.Equal(got, c.want) {
			t.Errorf("niceTicks(%v, %d) = %v, want %v", c.v, c.n, got, c.want)
		}
	}
}

func TestFormatTick(t *testing.T) {
	for _, c := range []struct {
		v, step float64
		want    string
	}{
		{12000, 2000, "12,000"}, {1234567, 1, "1,234,567"}, {2.5, 0.5, "2.5"}, {7.5, 2.5, "7.5"},
		{0.25, 0.25, "0.25"}, {0.6000000000000001, 0.2, "0.6"}, {0, 100, "0"}, {999, 1, "999"},
	} {
		if got := formatTick(c.v, c.step); got != c.want {
			t.Errorf("formatTick(%v, %v) = %q, want %q", c.v, c.step, got, c.want)
		}
	}
}

// TestSecondPoints: seconds a step covers in part are scaled by the part,
// and the second two steps share is one point.
func TestSecondPoints(t *testing.T) {
	t0 := time.Unix(1000, 0)
	sec := func(i int) time.Time { return t0.Add(time.Duration(i) * time.Second) }
	half := 500 * time.Millisecond
	r := &Report{Started: t0,
		Steps: []StepSummary{{Started: sec(0).Add(half), Duration: 2 * time.Second, Ended: sec(2).Add(half)},
			// Sends until 3.5, its last answers arrive until 4.5.
			{Started: sec(2).Add(half), Duration: time.Second, Ended: sec(4).Add(half)}},
		Seconds: []Second{
			{At: sec(0), Offered: 500, Achieved: 500, P99Millis: 1},
			{At: sec(1), Offered: 1000, Achieved: 990, Errors: 10, P99Millis: 2},
			{At: sec(2), Offered: 500, Achieved: 500, P99Millis: 3},
			{At: sec(2), Offered: 1000, Achieved: 800, Errors: 200, P99Millis: 40}, // the second step's first half second
			{At: sec(3), Offered: 1000, Achieved: 1800, P99Millis: 5},
			{At: sec(4), Achieved: 100, P99Millis: 7}, // the last answers, nothing sent
			{At: sec(5)}, // after the last step ended
		}}
	got := r.secondPoints()
	want := []secondPoint{
		{at: sec(0), offered: 1000, achieved: 1000, p99: 1, sending: true},
		{at: sec(1), offered: 1000, achieved: 990, errors: 10, p99: 2, sending: true},
		{at: sec(2), offered: 1500, achieved: 1300, errors: 200, p99: 40, sending: true},
		{at: sec(3), offered: 2000, achieved: 1800, p99: 5, sending: true},
		{at: sec(4), achieved: 200, p99: 7},
	}
	if len(got) != len(want) {
		t.Fatalf("points %+v, want %+v", got, want)
	}
	for i := range want {
		g, w := got[i], want[i]
		near := func(a, b float64) bool { return a-b < 1e-6 && b-a < 1e-6 }
		if !g.at.Equal(w.at) || !near(g.offered, w.offered) || !near(g.achieved, w.achieved) || !near(g.errors, w.errors) || g.p99 != w.p99 || g.sending != w.sending {
			t.Errorf("point %d = %+v, want %+v", i, g, w)
		}
	}
}

// TestWriteHTMLRamp: the page is self-contained (no script, nothing
// loaded), marks each step with its rate and verdict, draws the lag bound,
// and has every series in a legend row above its plot.
func TestWriteHTMLRamp(t *testing.T) {
	t0 := time.Unix(2000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	r := &Report{Started: t0, LagBound: 250 * time.Millisecond, HighestSustained: 1996,
		Steps: []StepSummary{
			{OfferedRate: 2000, Held: true, Started: at(0), Duration: 5 * time.Second, Ended: at(5)},
			{OfferedRate: 4000, Held: false, Failures: []string{"achieved 3000/s < 95% of 4000/s offered"}, Started: at(5.2), Duration: 5 * time.Second, Ended: at(10.2)},
		}}
	for i := range 11 {
		r.Seconds = append(r.Seconds, Second{At: at(float64(i)), Offered: 2000, Achieved: 1990, P50Millis: 1, P99Millis: 9})
		r.LagSeconds = append(r.LagSeconds, LagSecond{At: at(float64(i)), Measured: 1990, P50: 5 * time.Millisecond, P99: time.Duration(i) * 40 * time.Millisecond})
		r.Queue = append(r.Queue, QueueSample{At: at(float64(i)), Pending: map[string]uint64{"p": uint64(10 * i)}, AckPending: map[string]uint64{}})
	}
	var b bytes.Buffer
	if err := r.WriteHTML(&b); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	for _, bad := range []string{"<script", "src=", "href=", "@import", "url("} {
		if strings.Contains(page, bad) {
			t.Errorf("page has %q: not self-contained", bad)
		}
	}
	for _, want := range []string{">2,000/s<", ">held<", ">4,000/s<", ">failed<", "step bound: p99 &lt;= 250ms",
		"Highest sustained rate: 1,996 tokens/s", "Step 4,000/s failed: achieved 3000/s &lt; 95% of 4000/s offered.", ">achieved (200 answers)<", ">failed or dropped<", ">p99<", ">400<"} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if n := strings.Count(page, "<svg"); n != 4 {
		t.Errorf("%d panels, want 4", n)
	}
	// Legend text sits above the plot area of its panel.
	for _, m := range regexp.MustCompile(`<text x="[0-9.]+" y="([0-9.]+)" font-size="12">`).FindAllStringSubmatch(page, -1) {
		if m[1] != "40" || 40 >= marginT {
			t.Errorf("legend entry at y=%s, plot area starts at %v", m[1], marginT)
		}
	}
}

// TestWriteHTMLConstant: a constant-rate run has no verdicts to mark.
func TestWriteHTMLConstant(t *testing.T) {
	t0 := time.Unix(2000, 0)
	r := &Report{Started: t0, Steps: []StepSummary{{OfferedRate: 1000, Started: t0, Ended: t0.Add(3 * time.Second)}},
		Seconds: []Second{{At: t0, Offered: 1000, Achieved: 1000}, {At: t0.Add(time.Second), Offered: 1000, Achieved: 1000}}}
	var b bytes.Buffer
	if err := r.WriteHTML(&b); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{">held<", ">failed<", "step bound"} {
		if strings.Contains(b.String(), bad) {
			t.Errorf("constant run's page has %q", bad)
		}
	}
}
