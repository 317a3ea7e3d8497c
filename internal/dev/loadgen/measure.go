package loadgen

import (
	"context"
	"fmt"
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
	if every < 1 {
		every = 1
	}
	// A coalesced token reaches many requests: measure it once, from the
	// first answer that carried it.
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
	received := make(map[string]time.Time, len(sample))
	var lags []time.Duration
	const chunk = 5000
	for lo := 0; lo < len(sample); lo += chunk {
		part := sample[lo:min(lo+chunk, len(sample))]
		digests := make([]events.Digest, len(part))
		for i, tk := range part {
			digests[i] = tk.Digest
			received[string(tk.Digest[:])] = tk.Received
		}
		rows, err := store.RowStates(ctx, pool, digests)
		if err != nil {
			return LagResult{}, fmt.Errorf("read persisted_at: %w", err)
		}
		for _, r := range rows {
			lags = append(lags, max(0, r.PersistedAt.Sub(received[string(r.Digest[:])])))
		}
	}
	r := LagResult{Measured: len(lags), Unpersisted: len(sample) - len(lags)}
	if len(lags) == 0 {
		return r, nil
	}
	slices.Sort(lags)
	q := func(p float64) time.Duration { return lags[min(len(lags)-1, int(p*float64(len(lags))))] }
	r.P50, r.P99, r.Max = q(0.50), q(0.99), lags[len(lags)-1]
	return r, nil
}
