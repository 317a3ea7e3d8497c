// Package loadgen drives a running issuer over real HTTP at a fixed arrival
// rate and measures what a platform team needs to size a deployment: HTTP
// latency, issue-to-persisted lag, queue lag over time, and whether every
// token handed out was persisted.
package loadgen

import (
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"

	"github.com/tokenpipe/tokenpipe/events"
)

// Mix is the share of operations of each kind; the rest mint fresh keys.
type Mix struct {
	Reissue   float64 // re-request a key issued earlier in the run
	Duplicate float64 // fire DupWidth identical requests at the same instant
	DupWidth  int
	// Keys, if set, is the number of keys of the run: once that many were
	// used, every "fresh" operation asks for one of them again, in turn, as
	// a client holding a few tokens does.
	Keys int
}

// Target is the endpoint and the credentials of a client allowed the scopes
// p0000 .. p<ScopePool-1>; a key is a pair of them.
type Target struct {
	URL string
	// URLs are further endpoints of the same deployment (other issuers):
	// requests go round-robin over URL and URLs.
	URLs      []string
	ClientID  string
	Secret    string
	ScopePool int
}

// Step is one constant-rate period.
type Step struct {
	Rate        float64 // operations per second
	Duration    time.Duration
	Concurrency int // most requests in flight; beyond it a request is dropped, not delayed
}

// Token is one token handed out, with the moment its request was sent and
// the moment its answer arrived.
type Token struct {
	Digest   events.Digest
	Sent     time.Time
	Received time.Time
	Kind     string
	Key      string // the scope pair asked for
}

// Second is one second of a run, for the time series.
type Second struct {
	At        time.Time
	Offered   int     // requests scheduled
	Achieved  int     // 200 answers received
	Errors    int     // non-200 answers, transport errors and drops
	P50Millis float64 // HTTP p50 of answers received in this second
	P99Millis float64 // HTTP p99 of answers received in this second
}

// StepResult is what one step measured.
type StepResult struct {
	Step
	Sent, OK, Dropped int
	Errors            map[string]int
	Latency           *hdrhistogram.Histogram // microseconds, from the scheduled send time
	Seconds           []Second
	Tokens            []Token
	Started, Ended    time.Time
}

// AchievedRate is 200 answers per second over the step.
func (r *StepResult) AchievedRate() float64 {
	return float64(r.OK) / r.Ended.Sub(r.Started).Seconds()
}

// ErrorRate is the share of requests that did not get a token.
func (r *StepResult) ErrorRate() float64 {
	if r.Sent == 0 {
		return 0
	}
	return float64(r.Sent-r.OK) / float64(r.Sent)
}

// Generator holds the keys of one run, so later steps can re-issue keys that
// earlier ones minted.
type Generator struct {
	target Target
	mix    Mix
	wire   *wireClient
	rng    *rand.Rand
	mu     sync.Mutex
	keys   []string
	next   int // fresh key counter
	rr     atomic.Uint64
}

// New returns a generator for target.
func New(target Target, mix Mix, maxConns int) *Generator {
	if mix.DupWidth < 2 {
		mix.DupWidth = 2
	}
	return &Generator{
		target: target, mix: mix,
		wire: newWireClient(target, maxConns),
		rng:  rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 42)),
	}
}

// Close closes the generator's connections.
func (g *Generator) Close() { g.wire.closeAll() }

// freshKey returns a scope pair never used before in this run, or with
// Mix.Keys, the next of the run's keys once they are all in use.
func (g *Generator) freshKey() string {
	if g.mix.Keys > 0 && len(g.keys) >= g.mix.Keys {
		k := g.keys[g.next%g.mix.Keys]
		g.next++
		return k
	}
	n := g.target.ScopePool
	i := g.next
	g.next++
	a := i % n
	b := (a + 1 + (i/n)%(n-1)) % n
	if a > b {
		a, b = b, a
	}
	k := fmt.Sprintf("p%04d p%04d", a, b)
	g.keys = append(g.keys, k)
	return k
}

// pick chooses the kind and key of the next operation.
func (g *Generator) pick() (kind, key string, width int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.rng.Float64()
	switch {
	case r < g.mix.Reissue && len(g.keys) > 0:
		return "reissue", g.keys[g.rng.IntN(len(g.keys))], 1
	case r < g.mix.Reissue+g.mix.Duplicate:
		return "duplicate", g.freshKey(), g.mix.DupWidth
	default:
		return "fresh", g.freshKey(), 1
	}
}

// Run sends operations open-loop at step.Rate for step.Duration: operation
// i is due at start + i/rate whether or not earlier ones answered, and its
// latency counts from that due time, so a slow server cannot hide latency by
// slowing the generator down (coordinated omission). progress, if not nil,
// is called about every 250 ms with the result so far.
func (g *Generator) Run(ctx context.Context, step Step, progress func(*StepResult)) *StepResult {
	res := &StepResult{Step: step, Errors: map[string]int{}, Latency: newHist()}
	var mu sync.Mutex
	perSecond := map[int64]*secondAcc{}
	acc := func(t time.Time) *secondAcc {
		k := t.Unix()
		s, ok := perSecond[k]
		if !ok {
			s = &secondAcc{hist: newHist()}
			perSecond[k] = s
		}
		return s
	}
	// A fixed set of senders, one per request that may be in flight: a
	// request due when none is free is dropped, not delayed (open loop).
	type job struct {
		due       time.Time
		kind, key string
	}
	jobs := make(chan job, step.Concurrency)
	var inFlight atomic.Int64
	var senders sync.WaitGroup
	for range step.Concurrency {
		senders.Add(1)
		go func() {
			defer senders.Done()
			for j := range jobs {
				sent := time.Now()
				token, errKind := g.request(ctx, j.key)
				now := time.Now()
				inFlight.Add(-1)
				mu.Lock()
				s := acc(now)
				if errKind != "" {
					res.Errors[errKind]++
					s.errors++
					mu.Unlock()
					continue
				}
				lat := now.Sub(j.due).Microseconds()
				_ = res.Latency.RecordValue(lat)
				_ = s.hist.RecordValue(lat)
				s.achieved++
				res.OK++
				res.Tokens = append(res.Tokens, Token{Digest: events.Digest(sha256.Sum256([]byte(token))), Sent: sent, Received: now, Kind: j.kind, Key: j.key})
				mu.Unlock()
			}
		}()
	}
	// Requests in flight when ctx ends fail at once instead of running out
	// their timeout.
	stopClosing := context.AfterFunc(ctx, g.wire.closeAll)
	defer stopClosing()
	start := time.Now()
	res.Started = start
	end := start.Add(step.Duration)
	interval := time.Duration(float64(time.Second) / step.Rate)
	lastProgress := start
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for i := 0; ; i++ {
		due := start.Add(time.Duration(i) * interval)
		if !due.Before(end) || ctx.Err() != nil {
			break
		}
		if d := time.Until(due); d > 0 {
			timer.Reset(d)
			select {
			case <-ctx.Done():
			case <-timer.C:
			}
		}
		kind, key, width := g.pick()
		for range width {
			mu.Lock()
			res.Sent++
			acc(due).offered++
			mu.Unlock()
			if inFlight.Load() >= int64(step.Concurrency) {
				mu.Lock()
				res.Dropped++
				res.Errors["dropped: client saturated"]++
				acc(due).errors++
				mu.Unlock()
				continue
			}
			inFlight.Add(1)
			jobs <- job{due: due, kind: kind, key: key} // never blocks: room for Concurrency

		}
		if progress != nil && time.Since(lastProgress) >= 250*time.Millisecond {
			lastProgress = time.Now()
			mu.Lock()
			snap := *res
			snap.Latency = hdrhistogram.Import(res.Latency.Export())
			snap.Errors = maps.Clone(res.Errors)
			snap.Tokens = nil
			mu.Unlock()
			snap.Ended = time.Now()
			progress(&snap)
		}
	}
	close(jobs)
	senders.Wait()
	res.Ended = time.Now()
	for sec := start.Unix(); sec <= res.Ended.Unix(); sec++ {
		s, ok := perSecond[sec]
		if !ok {
			s = &secondAcc{hist: newHist()}
		}
		res.Seconds = append(res.Seconds, Second{
			At: time.Unix(sec, 0), Offered: s.offered, Achieved: s.achieved, Errors: s.errors,
			P50Millis: float64(s.hist.ValueAtQuantile(50)) / 1000,
			P99Millis: float64(s.hist.ValueAtQuantile(99)) / 1000,
		})
	}
	return res
}

type secondAcc struct {
	offered, achieved, errors int
	hist                      *hdrhistogram.Histogram
}

// newHist records 1 µs to 60 s with 3 significant digits.
func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, 60_000_000, 3) }

// request performs one client_credentials request for the scope pair key,
// round-robin over the target's URLs.
func (g *Generator) request(ctx context.Context, key string) (token, errKind string) {
	if ctx.Err() != nil {
		return "", "timeout"
	}
	target := g.target.URL
	if n := uint64(len(g.target.URLs)); n > 0 {
		if i := g.rr.Add(1) % (n + 1); i > 0 {
			target = g.target.URLs[i-1]
		}
	}
	return g.wire.tokenRequest(target, key)
}
