package loadgen

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// QueueSample is the backlog of the durable consumers at one moment.
type QueueSample struct {
	At         time.Time
	Pending    map[string]uint64 // not yet delivered, per consumer
	AckPending map[string]uint64 // delivered, not acknowledged, per consumer
}

// Lag is pending + ack pending summed over the consumers: the number KEDA's
// nats-jetstream scaler acts on.
func (q QueueSample) Lag() uint64 {
	var n uint64
	for k, v := range q.Pending {
		n += v + q.AckPending[k]
	}
	return n
}

// Sampler reads consumer info every interval in the background.
type Sampler struct {
	mu      sync.Mutex
	samples []QueueSample
	stop    context.CancelFunc
	done    chan struct{}
}

// StartSampler samples the named consumers of stream every interval until
// Stop. Failed reads are skipped, not fatal: the broker may be the thing
// under stress.
func StartSampler(ctx context.Context, js jetstream.JetStream, stream string, consumers []string, interval time.Duration) *Sampler {
	ctx, cancel := context.WithCancel(ctx)
	s := &Sampler{stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			q := QueueSample{At: time.Now(), Pending: map[string]uint64{}, AckPending: map[string]uint64{}}
			ok := true
			for _, name := range consumers {
				rctx, rcancel := context.WithTimeout(ctx, interval)
				c, err := js.Consumer(rctx, stream, name)
				if err == nil {
					var info *jetstream.ConsumerInfo
					if info, err = c.Info(rctx); err == nil {
						q.Pending[name], q.AckPending[name] = info.NumPending, uint64(info.NumAckPending)
					}
				}
				rcancel()
				ok = ok && err == nil
			}
			if ok {
				s.mu.Lock()
				s.samples = append(s.samples, q)
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// Samples returns a copy of what was sampled so far.
func (s *Sampler) Samples() []QueueSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.samples)
}

// Last returns the newest sample (zero if none).
func (s *Sampler) Last() QueueSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == 0 {
		return QueueSample{}
	}
	return s.samples[len(s.samples)-1]
}

// Stop ends sampling.
func (s *Sampler) Stop() { s.stop(); <-s.done }

// LagResult is issue-to-persisted lag over a set of tokens.
type LagResult struct {
	Measured    int // tokens whose row was found
	Unpersisted int // tokens with no row yet
	P50, P99    time.Duration
	Max         time.Duration
}

// PersistLag measures, for every n-th token, the time from the answer
// reaching the client to the row's persisted_at (clock_timestamp() at insert,
// on the same machine's clock). Tokens without a row are counted apart. A
// token handed to several requests counts once.
func PersistLag(ctx context.Context, pool *pgxpool.Pool, tokens []Token, every int) (LagResult, error) {
	lags, unpersisted, err := tokenLags(ctx, pool, tokens, every)
	if err != nil {
		return LagResult{}, err
	}
	r := LagResult{Measured: len(lags), Unpersisted: unpersisted}
	if len(lags) == 0 {
		return r, nil
	}
	ds := make([]time.Duration, len(lags))
	for i, l := range lags {
		ds[i] = l.lag
	}
	slices.Sort(ds)
	r.P50, r.P99, r.Max = quantile(ds, 0.50), quantile(ds, 0.99), ds[len(ds)-1]
	return r, nil
}

// quantile of sorted durations (not empty).
func quantile(sorted []time.Duration, p float64) time.Duration {
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

// LagSecond is the issue-to-persisted lag of the tokens whose answer
// arrived in one second.
type LagSecond struct {
	At       time.Time     `json:"at"`
	Measured int           `json:"measured"`
	P50      time.Duration `json:"p50"`
	P99      time.Duration `json:"p99"`
}

// LagBySecond measures the lag of every n-th token, as PersistLag does,
// and groups it by the second its answer arrived in; seconds without a
// persisted token are left out.
func LagBySecond(ctx context.Context, pool *pgxpool.Pool, tokens []Token, every int) ([]LagSecond, error) {
	lags, _, err := tokenLags(ctx, pool, tokens, every)
	if err != nil {
		return nil, err
	}
	return groupBySecond(lags), nil
}

// tokenLag is one token's answer time and its lag to persisted.
type tokenLag struct {
	received time.Time
	lag      time.Duration
}

func groupBySecond(lags []tokenLag) []LagSecond {
	bySec := map[int64][]time.Duration{}
	for _, l := range lags {
		bySec[l.received.Unix()] = append(bySec[l.received.Unix()], l.lag)
	}
	var out []LagSecond
	for _, sec := range slices.Sorted(maps.Keys(bySec)) {
		ds := bySec[sec]
		slices.Sort(ds)
		out = append(out, LagSecond{At: time.Unix(sec, 0), Measured: len(ds), P50: quantile(ds, 0.50), P99: quantile(ds, 0.99)})
	}
	return out
}

// tokenLags reads persisted_at for every n-th token (each distinct token
// once, from the first answer that carried it: a coalesced token reaches
// many requests) and returns the lags found and how many had no row.
func tokenLags(ctx context.Context, pool *pgxpool.Pool, tokens []Token, every int) ([]tokenLag, int, error) {
	if every < 1 {
		every = 1
	}
	first := make(map[events.Digest]int, len(tokens))
	var sample []Token
	for i := 0; i < len(tokens); i += every {
		t := tokens[i]
		if j, ok := first[t.Digest]; ok {
			if t.Received.Before(sample[j].Received) {
				sample[j] = t
			}
			continue
		}
		first[t.Digest] = len(sample)
		sample = append(sample, t)
	}
	received := make(map[events.Digest]time.Time, len(sample))
	var lags []tokenLag
	const chunk = 5000
	for lo := 0; lo < len(sample); lo += chunk {
		part := sample[lo:min(lo+chunk, len(sample))]
		digests := make([]events.Digest, len(part))
		for i, tk := range part {
			digests[i] = tk.Digest
			received[tk.Digest] = tk.Received
		}
		rows, err := store.RowStates(ctx, pool, digests)
		if err != nil {
			return nil, 0, fmt.Errorf("read persisted_at: %w", err)
		}
		for _, r := range rows {
			at := received[r.Digest]
			lags = append(lags, tokenLag{received: at, lag: max(0, r.PersistedAt.Sub(at))})
		}
	}
	return lags, len(sample) - len(lags), nil
}
