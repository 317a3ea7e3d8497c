package app

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/issuer"
	"github.com/tokenpipe/tokenpipe/persister"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// PipelineConfig says which parts of the pipeline StartPipeline runs. It is
// the one wiring of persister, recovery and issuer: the roles, the demo, the
// benchmarks and the in-process tests all start them through it.
type PipelineConfig struct {
	// Persister and Recovery, when set, start that consumer's worker pool.
	// With a partitioned topology the persister runs one writer per
	// partition in PersisterPartitions (nil: every partition).
	Persister           *consume.Settings
	PersisterPartitions []int
	Recovery            *consume.Settings

	// Issuer, when set, serves the token endpoints on Listener (or, if nil,
	// Addr) until the pipeline stops, finishing requests within IssuerGrace.
	// NC is its NATS connection in async mode (nil in sync mode) and Clients
	// its client registry.
	Issuer      *issuer.Config
	Clients     *clients.Registry
	NC          *nats.Conn
	Listener    net.Listener
	Addr        string
	IssuerGrace time.Duration

	// Metrics registers every part's series; nil: a private registry.
	Metrics prometheus.Registerer
	Log     *slog.Logger
	// OnStop, if set, hears of a part that stopped with an error other than
	// the pipeline's own cancellation, as soon as it happens.
	OnStop func(part string, err error)
}

// Pipeline is the running parts. Every goroutine it starts is waited for by
// Stop or Wait.
type Pipeline struct {
	// Issuer is the token server, nil unless PipelineConfig.Issuer was set.
	Issuer *issuer.Server

	cancel  context.CancelFunc
	wg      sync.WaitGroup
	stopped chan struct{} // closed when the first part returns
	once    sync.Once
	mu      sync.Mutex
	err     error
}

// StartPipeline starts the configured parts on the given connections. They
// run until ctx ends or Stop is called.
func StartPipeline(ctx context.Context, pool *pgxpool.Pool, js jetstream.JetStream, c PipelineConfig) *Pipeline {
	reg := c.Metrics
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	runCtx, cancel := context.WithCancel(ctx)
	p := &Pipeline{cancel: cancel, stopped: make(chan struct{})}
	if c.Issuer != nil {
		p.Issuer = issuer.New(*c.Issuer, c.Clients, c.NC, js, pool, c.Log, issuer.NewMetrics(reg))
		serve := func(ctx context.Context) error { return p.Issuer.Serve(ctx, c.Addr, c.IssuerGrace) }
		if c.Listener != nil {
			serve = func(ctx context.Context) error { return p.Issuer.ServeListener(ctx, c.Listener, c.IssuerGrace) }
		}
		p.start(runCtx, "issuer", serve, c.OnStop)
	}
	if c.Persister != nil {
		metrics := persister.NewMetrics(reg)
		for _, s := range persisterPools(*c.Persister, c.PersisterPartitions) {
			per := persister.New(s, pool, js, c.Log, metrics)
			p.start(runCtx, "persister", per.Run, c.OnStop)
		}
	}
	if c.Recovery != nil {
		rec := recovery.New(*c.Recovery, pool, js, c.Log, recovery.NewMetrics(reg))
		p.start(runCtx, "recovery", rec.Run, c.OnStop)
	}
	return p
}

// persisterPools are the worker pools a persister runs. Unpartitioned: one
// pool on the shared consumer, as configured. Partitioned: one writer (one
// batch in flight) per bound partition, so no two transactions ever hold
// events of one key at once, and, with partition 0, one more on the
// unpartitioned consumer, which drains the events published before
// partitioning was turned on and is idle after.
func persisterPools(s consume.Settings, bound []int) []consume.Settings {
	if !s.Topology.Partitioned() {
		return []consume.Settings{s}
	}
	if bound == nil {
		for p := range s.Topology.Partitions {
			bound = append(bound, p)
		}
	}
	one := s
	one.Pool.Workers = 1
	var pools []consume.Settings
	for _, p := range bound {
		part := one
		part.Topology = s.Topology.ForPartition(p)
		pools = append(pools, part)
		if p == 0 {
			pools = append(pools, one)
		}
	}
	return pools
}

func (p *Pipeline) start(ctx context.Context, part string, run func(context.Context) error, onStop func(string, error)) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		err := run(ctx)
		if err != nil && !(errors.Is(err, context.Canceled) && ctx.Err() != nil) {
			if onStop != nil {
				onStop(part, err)
			}
		} else {
			err = nil
		}
		p.mu.Lock()
		if p.err == nil {
			p.err = err
		}
		p.mu.Unlock()
		p.once.Do(func() { close(p.stopped) })
	}()
}

// Stopped is closed as soon as any part returns, on its own or because the
// pipeline was stopped.
func (p *Pipeline) Stopped() <-chan struct{} { return p.stopped }

// Wait waits until every part has returned and gives the first error.
func (p *Pipeline) Wait() error {
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Stop cancels every part and waits for them.
func (p *Pipeline) Stop() error {
	p.cancel()
	return p.Wait()
}
