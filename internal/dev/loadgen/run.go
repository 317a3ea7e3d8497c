package loadgen

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Ramp steps the rate up until the lag or error bound is passed.
type Ramp struct {
	Start, Step, Max float64       // operations per second
	StepDuration     time.Duration // each step's length
	LagBound         time.Duration // p99 issue-to-persisted lag a step may not exceed
	ErrorBound       float64       // share of failed requests a step may not exceed
}

// Options configures a load test.
type Options struct {
	Target      Target
	Mix         Mix
	Rate        float64 // constant mode
	Duration    time.Duration
	Concurrency int
	Ramp        *Ramp // if set, ramp mode instead of constant
	LagEvery    int   // measure persist lag for every n-th token (1 = all)
	// Warmup runs the constant rate this long first, unmeasured (its tokens
	// are still verified), so connection set-up does not count as latency.
	Warmup time.Duration

	Pool      *pgxpool.Pool
	JS        jetstream.JetStream
	Stream    string
	Consumers []string

	// CoalesceWindow is the issuers' TOKENPIPE_COALESCE_WINDOW: the most
	// distinct tokens a key got per window is judged against WindowBound;
	// 0 skips that (without coalescing every request gets its own token).
	CoalesceWindow time.Duration
	WindowBound    int
	// DeadMargin: see audit.DefaultDeadMargin.
	DeadMargin time.Duration

	DrainTimeout time.Duration
	Progress     io.Writer // live progress; nil for none
	Terminal     bool      // rewrite one line in place instead of printing lines
}

// StepSummary is one step's figures.
type StepSummary struct {
	OfferedRate  float64        `json:"offered_rate"`
	AchievedRate float64        `json:"achieved_rate"`
	Sent         int            `json:"sent"`
	OK           int            `json:"ok"`
	Errors       map[string]int `json:"errors"`
	HTTP         Percentiles    `json:"http_ms"`
	Lag          LagResult      `json:"persist_lag"`
	Held         bool           `json:"held"`
	// Failures says which of the ramp's bounds a step that did not hold
	// passed.
	Failures []string      `json:"failures,omitempty"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration"` // of the sending; answers may arrive until Ended
	Ended    time.Time     `json:"ended"`
}

// failures lists the bounds a ramp step passed; none if it held.
func (r *Ramp) failures(s StepSummary, errorRate float64) []string {
	var out []string
	if s.Lag.P99 > r.LagBound {
		out = append(out, fmt.Sprintf("p99 issue-to-persisted lag %s > %s", s.Lag.P99.Round(time.Millisecond), r.LagBound))
	}
	if s.Lag.Unpersisted > 0 {
		out = append(out, fmt.Sprintf("%d tokens not persisted", s.Lag.Unpersisted))
	}
	if errorRate > r.ErrorBound {
		out = append(out, fmt.Sprintf("%.1f%% of requests failed > %.1f%%", 100*errorRate, 100*r.ErrorBound))
	}
	if s.AchievedRate < 0.95*s.OfferedRate {
		out = append(out, fmt.Sprintf("achieved %.0f/s < 95%% of %.0f/s offered", s.AchievedRate, s.OfferedRate))
	}
	return out
}

// Percentiles of HTTP latency in milliseconds.
type Percentiles struct {
	P50, P90, P99, P999, Max float64
}

// Report is the whole run.
type Report struct {
	Started          time.Time     `json:"started"`
	Steps            []StepSummary `json:"steps"`
	HighestSustained float64       `json:"highest_sustained_rate,omitempty"`
	Seconds          []Second      `json:"seconds"`
	// LagSeconds is issue-to-persisted lag by the second the answers
	// arrived in.
	LagSeconds []LagSecond `json:"persist_lag_seconds"`
	// LagBound is the ramp's bound on a step's p99 lag; 0 when not ramping
	// (no step is judged).
	LagBound  time.Duration `json:"ramp_lag_bound,omitempty"`
	Queue     []QueueSample `json:"queue"`
	DrainTime time.Duration `json:"drain_time"`
	Audit     *audit.Report `json:"audit"`
	Inactive  int           `json:"rows_made_inactive"`
	// ClientVisible is what clients saw: tokens handed out already dead and
	// the most distinct tokens per key per coalescing window.
	ClientVisible *audit.ClientReport `json:"client_visible"`
}

// Clean reports whether the audit and the client-visible checks passed.
func (r *Report) Clean() bool {
	return (r.Audit == nil || r.Audit.Clean()) && (r.ClientVisible == nil || r.ClientVisible.Clean())
}

func percentiles(r *StepResult) Percentiles {
	ms := func(q float64) float64 { return float64(r.Latency.ValueAtQuantile(q)) / 1000 }
	return Percentiles{P50: ms(50), P90: ms(90), P99: ms(99), P999: ms(99.9), Max: float64(r.Latency.Max()) / 1000}
}

// Run executes the load test and verifies the outcome.
func Run(ctx context.Context, o Options) (*Report, error) {
	g := New(o.Target, o.Mix, o.Concurrency)
	defer g.Close()
	sampler := StartSampler(ctx, o.JS, o.Stream, o.Consumers, 250*time.Millisecond)
	defer sampler.Stop()
	rep := &Report{Started: time.Now()}
	if o.Ramp != nil {
		rep.LagBound = o.Ramp.LagBound
	}
	var all []Token

	steps := []Step{{Rate: o.Rate, Duration: o.Duration, Concurrency: o.Concurrency}}
	if o.Ramp != nil {
		steps = nil
		for r := o.Ramp.Start; r <= o.Ramp.Max; r += o.Ramp.Step {
			steps = append(steps, Step{Rate: r, Duration: o.Ramp.StepDuration, Concurrency: o.Concurrency})
		}
	}
	var lastLine time.Time
	if o.Warmup > 0 && o.Ramp == nil {
		warm := g.Run(ctx, Step{Rate: o.Rate, Duration: o.Warmup, Concurrency: o.Concurrency}, nil)
		all = append(all, warm.Tokens...)
	}
	measuredFrom := len(all)
	for _, step := range steps {
		res := g.Run(ctx, step, func(r *StepResult) { progressLine(o, r, sampler.Last(), &lastLine) })
		all = append(all, res.Tokens...)
		rep.Seconds = append(rep.Seconds, res.Seconds...)
		sum := StepSummary{
			OfferedRate: step.Rate, AchievedRate: res.AchievedRate(), Sent: res.Sent, OK: res.OK,
			Errors: res.Errors, HTTP: percentiles(res),
			Started: res.Started, Duration: step.Duration, Ended: res.Ended,
		}
		if o.Ramp != nil {
			// Give the step's tokens time to land, then judge the step.
			waitPersisted(ctx, o.Pool, res.Tokens, 4*o.Ramp.LagBound)
			lag, err := PersistLag(ctx, o.Pool, res.Tokens, o.LagEvery)
			if err != nil {
				return nil, err
			}
			sum.Lag = lag
			sum.Failures = o.Ramp.failures(sum, res.ErrorRate())
			sum.Held = len(sum.Failures) == 0
			if o.Progress != nil {
				fmt.Fprintf(o.Progress, "\nstep %.0f/s: achieved %.0f/s, http p99 %.1f ms, persist lag p99 %s, unpersisted %d, errors %.2f%% %v, held=%v\n",
					step.Rate, sum.AchievedRate, sum.HTTP.P99, lag.P99.Round(time.Millisecond), lag.Unpersisted, 100*res.ErrorRate(), res.Errors, sum.Held)
			}
			rep.Steps = append(rep.Steps, sum)
			if !sum.Held {
				break
			}
			rep.HighestSustained = sum.AchievedRate
			continue
		}
		rep.Steps = append(rep.Steps, sum)
		if ctx.Err() != nil {
			break
		}
	}
	if o.Progress != nil && o.Terminal {
		fmt.Fprintln(o.Progress)
	}

	// Drain, then verify everything that was handed out.
	drainStart := time.Now()
	stream, err := o.JS.Stream(ctx, o.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream: %w", err)
	}
	digests := make([]events.Digest, len(all))
	for i, t := range all {
		digests[i] = t.Digest
	}
	for {
		rep.Audit, err = audit.Check(ctx, o.Pool, digests, stream, o.Consumers...)
		if err != nil {
			return nil, err
		}
		if rep.Audit.Clean() || time.Since(drainStart) > o.DrainTimeout || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	rep.DrainTime = time.Since(drainStart)
	if o.Ramp == nil && len(rep.Steps) == 1 {
		lag, err := PersistLag(ctx, o.Pool, all[measuredFrom:], o.LagEvery)
		if err != nil {
			return nil, err
		}
		rep.Steps[0].Lag = lag
	}
	if rep.LagSeconds, err = LagBySecond(ctx, o.Pool, all[measuredFrom:], o.LagEvery); err != nil {
		return nil, err
	}
	states, err := store.ClientStates(ctx, o.Pool, o.Target.ClientID)
	if err != nil {
		return nil, fmt.Errorf("count inactive: %w", err)
	}
	rep.Inactive = int(states["INACTIVE"])
	if rep.ClientVisible, err = clientVisible(ctx, o, all, rep.Started); err != nil {
		return nil, err
	}
	rep.Queue = sampler.Samples()
	return rep, nil
}

// clientVisible judges what the run's client received, once the rows are
// written: tokens handed out after their row was dead, and distinct tokens
// per key per coalescing window, from the rows and from receive times.
func clientVisible(ctx context.Context, o Options, all []Token, started time.Time) (*audit.ClientReport, error) {
	lastSent := LastSent(all)
	co := audit.ClientOptions{DeadMargin: o.DeadMargin, Window: o.CoalesceWindow, Bound: o.WindowBound, ClientID: o.Target.ClientID}
	if o.CoalesceWindow > 0 {
		// A coalesced token's issued_at is its window's start, which may
		// precede the run; rows of earlier runs of a reused client may not.
		co.Since = audit.WindowStart(started, o.CoalesceWindow)
	}
	r, err := audit.ClientVisible(ctx, o.Pool, lastSent, co)
	if err != nil {
		return nil, err
	}
	if o.CoalesceWindow > 0 {
		prefix := o.Target.ClientID + "/" + o.Target.ClientID + "/" // client_credentials: the subject is the client
		issues := make([]audit.Issue, len(all))
		for i, t := range all {
			issues[i] = audit.Issue{Key: prefix + t.Key, Digest: t.Digest, At: t.Received}
		}
		mx, _ := audit.MaxPerWindow(issues, o.CoalesceWindow, o.WindowBound)
		r.MaxReceived = &mx
	}
	return r, nil
}

// LastSent maps each token handed out to the send time of the last request
// that received it.
func LastSent(tokens []Token) map[events.Digest]time.Time {
	out := make(map[events.Digest]time.Time, len(tokens))
	for _, t := range tokens {
		if cur, ok := out[t.Digest]; !ok || t.Sent.After(cur) {
			out[t.Digest] = t.Sent
		}
	}
	return out
}

// waitPersisted waits until every token of the set has a row, or limit.
func waitPersisted(ctx context.Context, pool *pgxpool.Pool, tokens []Token, limit time.Duration) {
	digests := make([]events.Digest, len(tokens))
	for i := range tokens {
		digests[i] = tokens[i].Digest
	}
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		n, err := store.CountRows(ctx, pool, digests)
		if err == nil && n >= len(tokens) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func progressLine(o Options, r *StepResult, q QueueSample, lastLine *time.Time) {
	if o.Progress == nil {
		return
	}
	elapsed := time.Since(r.Started).Seconds()
	line := fmt.Sprintf("%5.1fs  offered %6.0f/s  achieved %6.0f/s  http p99 %7.1f ms  queue lag %7d  errors %d",
		elapsed, r.Step.Rate, float64(r.OK)/max(elapsed, 0.001), float64(r.Latency.ValueAtQuantile(99))/1000, q.Lag(), r.Sent-r.OK)
	if o.Terminal {
		fmt.Fprintf(o.Progress, "\r%s", line)
		return
	}
	if time.Since(*lastLine) >= 5*time.Second { // plain lines every 5 s when not a terminal
		*lastLine = time.Now()
		fmt.Fprintln(o.Progress, line)
	}
}
