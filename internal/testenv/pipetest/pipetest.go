// Package pipetest runs the token pipeline in-process against the machine's
// real Postgres and JetStream for the operator tools' tests (replay, dlq,
// status), the way persister's tests do: each test gets its own database,
// stream and consumers, removed when it ends.
package pipetest

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// Pipeline is one test's database and stream.
type Pipeline struct {
	Pool *pgxpool.Pool
	JS   jetstream.JetStream
	Topo events.Topology
}

// New gives the test a fresh database and stream.
func New(t *testing.T) *Pipeline {
	t.Helper()
	_, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	return &Pipeline{Pool: pool, JS: js, Topo: topo}
}

// Partition splits the test's issued subject into n partitions, as
// TOKENPIPE_PARTITIONS does, and provisions their consumers.
func (p *Pipeline) Partition(t *testing.T, n int) {
	t.Helper()
	p.Topo.Partitions = n
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := events.Provision(ctx, p.JS, p.Topo)
	testenv.Must(t, err, "provision partitions")
}

// StartPersister runs a persister bound to the given partitions (nil: all)
// with its series on reg, until the returned function is called or the
// test ends.
func (p *Pipeline) StartPersister(t *testing.T, partitions []int, reg prometheus.Registerer) (stop func()) {
	t.Helper()
	per := consume.Settings{
		Pool:  consume.Config{Workers: 2, BatchSize: 50, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: p.Topo, Finish: 5 * time.Second, NakDelay: time.Second,
	}
	pl := app.StartPipeline(context.Background(), p.Pool, p.JS, app.PipelineConfig{
		Persister: &per, PersisterPartitions: partitions, Metrics: reg, Log: testenv.Logger(t),
	})
	var once sync.Once
	stop = func() { once.Do(func() { _ = pl.Stop() }) }
	t.Cleanup(stop)
	return stop
}

// StartRecovery runs a recovery consumer alone.
func (p *Pipeline) StartRecovery(t *testing.T) (stop func()) {
	t.Helper()
	rec := consume.Settings{
		Pool:  consume.Config{Workers: 1, BatchSize: 200, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: p.Topo, Finish: 5 * time.Second, NakDelay: time.Second,
	}
	pl := app.StartPipeline(context.Background(), p.Pool, p.JS, app.PipelineConfig{Recovery: &rec, Log: testenv.Logger(t)})
	var once sync.Once
	stop = func() { once.Do(func() { _ = pl.Stop() }) }
	t.Cleanup(stop)
	return stop
}

// Start runs a persister pool and a recovery consumer. They stop when the
// returned function is called or the test ends, whichever is first.
func (p *Pipeline) Start(t *testing.T, workers int) (stop func()) {
	t.Helper()
	per := consume.Settings{
		Pool:  consume.Config{Workers: workers, BatchSize: 500, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: p.Topo, Finish: 5 * time.Second, NakDelay: time.Second,
	}
	rec := consume.Settings{
		Pool:  consume.Config{Workers: 1, BatchSize: 200, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: p.Topo, Finish: 5 * time.Second, NakDelay: time.Second,
	}
	pl := app.StartPipeline(context.Background(), p.Pool, p.JS, app.PipelineConfig{Persister: &per, Recovery: &rec, Log: testenv.Logger(t)})
	var once sync.Once
	stop = func() { once.Do(func() { _ = pl.Stop() }) }
	t.Cleanup(stop)
	return stop
}

// Drained waits until every durable consumer (each partition's too) has
// nothing pending.
func (p *Pipeline) Drained(t *testing.T) {
	t.Helper()
	testenv.Eventually(t, 60*time.Second, "consumers drained", func() (bool, error) {
		for _, name := range p.durables() {
			c, err := p.JS.Consumer(context.Background(), p.Topo.Stream, name)
			if err != nil {
				return false, err
			}
			info, err := c.Info(context.Background())
			if err != nil {
				return false, err
			}
			if info.NumPending+uint64(info.NumAckPending) > 0 {
				return false, nil
			}
		}
		return true, nil
	})
}

// Writer returns a replay writer on the test's database and stream.
func (p *Pipeline) Writer(t *testing.T) *replay.Writer {
	return &replay.Writer{DB: p.Pool, JS: p.JS, Topology: p.Topo, Retry: store.DefaultRetryPolicy(), Log: testenv.Logger(t)}
}

// Row is every column of tokens that a write decides; persisted_at and
// state_changed_at only say when.
type Row struct {
	Digest, Refresh            string
	ClientID, Subject, Scope   string
	State, GrantType, Instance string
	IssuedAt, ExpiresAt        time.Time
	StreamSeq                  int64
}

// Table returns the whole tokens table in digest order.
func (p *Pipeline) Table(t *testing.T) []Row {
	t.Helper()
	rows, err := p.Pool.Query(context.Background(), `
		SELECT encode(token_digest, 'hex'), coalesce(encode(refresh_digest, 'hex'), ''), client_id, subject, scope,
		       state, grant_type, instance, issued_at, expires_at, coalesce(stream_seq, 0)
		FROM tokens ORDER BY token_digest`)
	testenv.Must(t, err, "read table")
	defer rows.Close()
	var out []Row
	for rows.Next() {
		var r Row
		testenv.Must(t, rows.Scan(&r.Digest, &r.Refresh, &r.ClientID, &r.Subject, &r.Scope,
			&r.State, &r.GrantType, &r.Instance, &r.IssuedAt, &r.ExpiresAt, &r.StreamSeq), "scan row")
		r.IssuedAt, r.ExpiresAt = r.IssuedAt.UTC(), r.ExpiresAt.UTC()
		out = append(out, r)
	}
	testenv.Must(t, rows.Err(), "read table")
	return out
}

// States returns token digest -> state for every row.
func (p *Pipeline) States(t *testing.T) map[events.Digest]string {
	t.Helper()
	rows, err := p.Pool.Query(context.Background(), "SELECT token_digest, state FROM tokens")
	testenv.Must(t, err, "query states")
	defer rows.Close()
	out := map[events.Digest]string{}
	for rows.Next() {
		var d []byte
		var s string
		testenv.Must(t, rows.Scan(&d, &s), "scan")
		out[events.Digest(d)] = s
	}
	testenv.Must(t, rows.Err(), "rows")
	return out
}

// Exec runs a statement.
func (p *Pipeline) Exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	_, err := p.Pool.Exec(context.Background(), sql, args...)
	testenv.Must(t, err, sql)
}

// Count runs a query returning one integer.
func (p *Pipeline) Count(t *testing.T, sql string, args ...any) int {
	t.Helper()
	var n int
	testenv.Must(t, p.Pool.QueryRow(context.Background(), sql, args...).Scan(&n), sql)
	return n
}

// Consumers returns the names of every consumer on the stream, sorted.
func (p *Pipeline) Consumers(t *testing.T) []string {
	t.Helper()
	s, err := p.JS.Stream(context.Background(), p.Topo.Stream)
	testenv.Must(t, err, "stream")
	names := s.ConsumerNames(context.Background())
	var out []string
	for n := range names.Name() {
		out = append(out, n)
	}
	testenv.Must(t, names.Err(), "consumer names")
	slices.Sort(out)
	return out
}

// SubjectCount returns how many messages the stream holds on subject.
func (p *Pipeline) SubjectCount(t *testing.T, subject string) uint64 {
	t.Helper()
	s, err := p.JS.Stream(context.Background(), p.Topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := s.Info(context.Background(), jetstream.WithSubjectFilter(subject))
	testenv.Must(t, err, "stream info")
	return info.State.Subjects[subject]
}

// durables names the durable consumers Provision made.
func (p *Pipeline) durables() []string {
	return append(p.Topo.PersisterConsumers(), p.Topo.Recovery)
}

// AssertDurablesOnly fails unless the stream has exactly its durable
// consumers: a tool left nothing behind.
func (p *Pipeline) AssertDurablesOnly(t *testing.T) {
	t.Helper()
	want := p.durables()
	slices.Sort(want)
	if got := p.Consumers(t); !slices.Equal(got, want) {
		t.Fatalf("consumers = %v, want only the durables %v", got, want)
	}
}
