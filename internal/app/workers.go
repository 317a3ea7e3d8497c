package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/cleanup"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/ops"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// WorkerConfig configures the persister and recovery roles.
type WorkerConfig struct {
	Common
	Workers         int           `envconfig:"WORKERS" default:"2" desc:"concurrent batches in this process"`
	BatchSize       int           `envconfig:"BATCH_SIZE" default:"1000" desc:"most events per batch (one transaction)"`
	BatchWait       time.Duration `envconfig:"BATCH_WAIT" default:"20ms" desc:"how long a batch gathers after the queue was found empty, and the least time between the process's batches while they are not full; bounds added latency at low load"`
	RetryMaxElapsed time.Duration `envconfig:"RETRY_MAX_ELAPSED" default:"2m" desc:"give up retrying a transient database error after this long and return the batch for redelivery"`
	NakDelay        time.Duration `envconfig:"NAK_DELAY" default:"5s" desc:"redelivery delay for a batch that could not be written"`
	LagInterval     time.Duration `envconfig:"LAG_INTERVAL" default:"5s" desc:"how often to export the consumer's pending and ack-pending gauges"`
}

func (c *WorkerConfig) validate() error {
	if err := c.Common.validate(); err != nil {
		return err
	}
	switch {
	case c.Workers < 1 || c.Workers > 256:
		return fmt.Errorf("%s_WORKERS: must be between 1 and 256", EnvPrefix)
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return fmt.Errorf("%s_BATCH_SIZE: must be between 1 and 10000", EnvPrefix)
	case c.BatchWait <= 0:
		return fmt.Errorf("%s_BATCH_WAIT: must be positive", EnvPrefix)
	case c.RetryMaxElapsed <= 0:
		return fmt.Errorf("%s_RETRY_MAX_ELAPSED: must be positive", EnvPrefix)
	case c.Workers*c.BatchSize > c.MaxAckPending:
		return fmt.Errorf("%s_MAX_ACK_PENDING: %d is less than WORKERS*BATCH_SIZE = %d", EnvPrefix, c.MaxAckPending, c.Workers*c.BatchSize)
	}
	return nil
}

func (c *WorkerConfig) PoolConfig() consume.Config {
	return consume.Config{Workers: c.Workers, BatchSize: c.BatchSize, BatchWait: c.BatchWait}
}

// settings are the persister's and recovery's.
func (c *WorkerConfig) Settings() consume.Settings {
	return consume.Settings{
		Pool: c.PoolConfig(), Retry: c.RetryPolicy(), Topology: c.Topology(),
		Finish: c.ShutdownTimeout, NakDelay: c.NakDelay,
	}
}

func (c *WorkerConfig) RetryPolicy() store.RetryPolicy {
	p := store.DefaultRetryPolicy()
	p.MaxElapsed = c.RetryMaxElapsed
	return p
}

// roleEnv is what a worker role holds while it runs.
type roleEnv struct {
	log  *slog.Logger
	ops  *ops.Server
	nc   *nats.Conn
	js   jetstream.JetStream
	pool *pgxpool.Pool
}

// startRole connects to NATS and Postgres, provisions the stream and starts
// the ops server. The caller runs its loop and then calls stop.
func startRole(ctx context.Context, name string, c *Common, stderr io.Writer) (*roleEnv, func(), error) {
	log := NewLogger(c, stderr).With("role", name, "instance", instanceName())
	srv := ops.NewServer(log)
	srv.Profiling = c.Pprof
	nc, js, err := ConnectNATS(c, "tokenpipe-"+name, log, newConnMetrics(srv.Registry))
	if err != nil {
		return nil, nil, err
	}
	if _, err := events.Provision(ctx, js, c.Topology()); err != nil {
		nc.Close()
		return nil, nil, err
	}
	pool, err := ConnectPostgresAs(ctx, c, "tokenpipe-"+name)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	srv.AddCheck(natsCheck(nc))
	srv.AddCheck(pgCheck(pool))
	opsCtx, stopOps := context.WithCancel(context.WithoutCancel(ctx))
	opsDone := make(chan struct{})
	go func() {
		defer close(opsDone)
		if err := srv.Serve(opsCtx, c.OpsAddr); err != nil {
			log.Error("ops server failed", "err", err)
		}
	}()
	env := &roleEnv{log: log, ops: srv, nc: nc, js: js, pool: pool}
	stop := func() {
		// Acks are published asynchronously; Drain flushes them before close.
		if err := nc.Drain(); err != nil {
			log.Warn("nats drain", "err", err)
		}
		for !nc.IsClosed() {
			time.Sleep(10 * time.Millisecond)
		}
		pool.Close()
		stopOps()
		<-opsDone
	}
	return env, stop, nil
}

// sampleLag exports the consumers' backlog until ctx ends.
func sampleLag(ctx context.Context, env *roleEnv, streamName string, consumers []string, every time.Duration) func() {
	gauges := stream.NewLagGauges(env.ops.Registry)
	lagCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, consumer := range consumers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := env.js.Stream(lagCtx, streamName)
			if err != nil {
				env.log.Warn("lag gauges disabled", "consumer", consumer, "err", err)
				return
			}
			cons, err := st.Consumer(lagCtx, consumer)
			if err != nil {
				env.log.Warn("lag gauges disabled", "consumer", consumer, "err", err)
				return
			}
			gauges.Sample(lagCtx, env.log, st, cons, consumer, every)
		}()
	}
	return func() { cancel(); wg.Wait() }
}

// drainingOnCancel marks the ops server draining (readiness fails) as soon
// as ctx ends, while the role finishes its batches. The returned function
// stops the watch and waits for it.
func drainingOnCancel(ctx context.Context, env *roleEnv) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		select {
		case <-ctx.Done():
			env.ops.SetDraining()
		case <-quit:
		}
	}()
	return func() { close(quit); <-done }
}

// PersisterConfig is the persister role's: a worker pool, bound to some
// partitions when the issued subject is partitioned.
type PersisterConfig struct {
	WorkerConfig
	PartitionSet string `envconfig:"PARTITION_SET" desc:"with PARTITIONS > 1: the partitions this persister writes, e.g. 0,2 or 0-3 (empty: all); each has one batch in flight, WORKERS is not used; the owner of partition 0 also drains events published before partitioning"`

	partitions []int // PartitionSet parsed; nil: all
}

func (c *PersisterConfig) validate() error {
	if err := c.WorkerConfig.validate(); err != nil {
		return err
	}
	set, err := ParsePartitionSet(c.PartitionSet, c.Partitions)
	if err != nil {
		return fmt.Errorf("%s_PARTITION_SET: %v", EnvPrefix, err)
	}
	c.partitions = set
	return nil
}

// ParsePartitionSet reads a list of partitions and ranges ("0,2,5-7") among
// n. Empty means every partition (nil).
func ParsePartitionSet(s string, n int) ([]int, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	if n <= 1 {
		return nil, fmt.Errorf("%q given, but PARTITIONS is %d: there are no partitions to choose from", s, n)
	}
	seen := map[int]bool{}
	var set []int
	for _, item := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(strings.TrimSpace(item), "-")
		if !isRange {
			hi = lo
		}
		a, errA := strconv.Atoi(lo)
		b, errB := strconv.Atoi(hi)
		if errA != nil || errB != nil || a < 0 || b < a || b >= n {
			return nil, fmt.Errorf("%q is not a partition or range of partitions 0-%d", item, n-1)
		}
		for p := a; p <= b; p++ {
			if !seen[p] {
				seen[p] = true
				set = append(set, p)
			}
		}
	}
	slices.Sort(set)
	return set, nil
}

// boundConsumers names the consumers this persister reads.
func (c *PersisterConfig) boundConsumers() []string {
	var names []string
	for _, s := range persisterPools(c.Settings(), c.partitions) {
		names = append(names, s.Topology.Persister)
	}
	return names
}

// persisterGCPercent is the persister's GOGC unless the environment sets
// one. Its live heap is small (the batches in hand and the clients'
// buffers) while it allocates a batch's worth every few milliseconds, so at
// Go's default of 100 it collects many times a second for little: at 8,000
// tokens/s, 400 took its CPU per row from 27 to 18 µs and its drain from
// 50k to 54k rows/s, with a resident size of about 45 MB at 9,000 tokens/s.
const persisterGCPercent = 400

// TunePersisterGC applies persisterGCPercent unless GOGC is set, and returns
// a function that restores the previous setting.
func TunePersisterGC() (restore func()) {
	if os.Getenv("GOGC") != "" {
		return func() {}
	}
	prev := debug.SetGCPercent(persisterGCPercent)
	return func() { debug.SetGCPercent(prev) }
}

func RunPersister(ctx context.Context, args []string, _, stderr io.Writer) error {
	var cfg PersisterConfig
	if _, err := LoadConfig("persister", args, stderr, &cfg, ""); err != nil {
		return HelpIsNil(err)
	}
	defer TunePersisterGC()()
	env, stop, err := startRole(ctx, "persister", &cfg.Common, stderr)
	if err != nil {
		return err
	}
	defer stop()
	stopLag := sampleLag(ctx, env, cfg.Stream, cfg.boundConsumers(), cfg.LagInterval)
	defer stopLag()
	settings := cfg.Settings()
	pl := StartPipeline(ctx, env.pool, env.js, PipelineConfig{
		Persister: &settings, PersisterPartitions: cfg.partitions, Metrics: env.ops.Registry, Log: env.log,
	})
	defer drainingOnCancel(ctx, env)()
	return pl.Wait()
}

// RecoveryConfig is the recovery role's: a worker pool plus the scheduled
// cleanup, which runs here because recovery is the role with the fewest
// replicas (and cleanup's batches skip locked rows, so replicas do not clash).
type RecoveryConfig struct {
	WorkerConfig
	CleanupConfig
	CleanupInterval time.Duration `envconfig:"CLEANUP_INTERVAL" default:"10m" desc:"run the expiry cleanup this often inside the recovery role; 0 disables (then run tokenpipe cleanup from a scheduler)"`
}

func (c *RecoveryConfig) validate() error {
	if err := c.WorkerConfig.validate(); err != nil {
		return err
	}
	if c.CleanupInterval < 0 {
		return fmt.Errorf("%s_CLEANUP_INTERVAL: must not be negative", EnvPrefix)
	}
	return c.CleanupConfig.validate()
}

func RunRecovery(ctx context.Context, args []string, _, stderr io.Writer) error {
	var cfg RecoveryConfig
	if _, err := LoadConfig("recovery", args, stderr, &cfg, ""); err != nil {
		return HelpIsNil(err)
	}
	env, stop, err := startRole(ctx, "recovery", &cfg.Common, stderr)
	if err != nil {
		return err
	}
	defer stop()
	stopLag := sampleLag(ctx, env, cfg.Stream, []string{cfg.RecoveryName}, cfg.LagInterval)
	defer stopLag()
	defer drainingOnCancel(ctx, env)()
	if cfg.CleanupInterval > 0 {
		cleanCtx, stopClean := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			cleanup.Run(cleanCtx, env.pool, cfg.config(), cfg.CleanupInterval, env.log.With("job", "cleanup"), cleanup.NewMetrics(env.ops.Registry))
		}()
		defer func() { stopClean(); <-done }() // before stop closes the pool
	}
	settings := cfg.Settings()
	return StartPipeline(ctx, env.pool, env.js, PipelineConfig{Recovery: &settings, Metrics: env.ops.Registry, Log: env.log}).Wait()
}

// HelpIsNil makes -h exit 0.
func HelpIsNil(err error) error {
	if err == ErrHelp {
		return nil
	}
	return err
}
