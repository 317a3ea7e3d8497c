package bench

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/dev/loadgen"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// Pipeline is issuer, persister and recovery running in this process on a
// loopback port, against the given database and stream.
type Pipeline struct {
	URL      string
	ClientID string
	Secret   string
	running  *app.Pipeline
}

// PipelineOptions configures StartPipeline.
type PipelineOptions struct {
	Mode      string // issuer.ModeAsync or issuer.ModeSync
	Workers   int    // persister workers
	BatchSize int
	ScopePool int
	Topology  events.Topology
	Log       *slog.Logger
}

// StartPipeline starts the three roles and registers a client allowed
// p0000..p<ScopePool-1>.
func StartPipeline(ctx context.Context, pool *pgxpool.Pool, nc *nats.Conn, o PipelineOptions) (*Pipeline, error) {
	js, err := issuer.NewJetStream(nc, issuer.Config{MaxInFlight: 4096, PublishTimeout: 2 * time.Second})
	if err != nil {
		return nil, err
	}
	if _, err := events.Provision(ctx, js, o.Topology); err != nil {
		return nil, err
	}
	scopes := make([]string, o.ScopePool)
	for i := range scopes {
		scopes[i] = fmt.Sprintf("p%04d", i)
	}
	p := &Pipeline{ClientID: "bench-" + o.Mode}
	if p.Secret, err = clients.Add(ctx, pool, p.ClientID, scopes, []string{"client_credentials"}); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	p.URL = "http://" + addr + "/oauth2/token"
	secret := make([]byte, tokens.KeyMinBytes)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	keys, err := tokens.NewKeyring(secret)
	if err != nil {
		return nil, err
	}
	icfg := issuer.Config{
		Mode: o.Mode, TokenTTL: time.Hour, RefreshTTL: time.Hour, PublishTimeout: 2 * time.Second,
		SyncConflictRetries: 5, Instance: "bench", MaxBodyBytes: 8192, Topology: o.Topology,
		Keys: keys, CoalesceWindow: -1, // the matrix measures races, not their coalescing
	}
	per := consume.Settings{Pool: consume.Config{Workers: o.Workers, BatchSize: o.BatchSize, BatchWait: 20 * time.Millisecond},
		Retry: store.DefaultRetryPolicy(), Topology: o.Topology, Finish: 10 * time.Second, NakDelay: time.Second}
	rec := per
	rec.Pool.Workers = 1
	p.running = app.StartPipeline(context.WithoutCancel(ctx), pool, js, app.PipelineConfig{
		Persister: &per, Recovery: &rec,
		Issuer: &icfg, Clients: clients.NewRegistry(pool, time.Minute), NC: nc, Addr: addr, IssuerGrace: 10 * time.Second,
		Log: o.Log, OnStop: func(_ string, err error) { o.Log.Error("bench role stopped", "err", err) },
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if resp, err := http.Get("http://" + addr + "/"); err == nil {
			resp.Body.Close()
			return p, nil
		}
	}
	p.Stop()
	return nil, fmt.Errorf("bench issuer did not start on %s", addr)
}

// Stop stops the roles and waits for them.
func (p *Pipeline) Stop() { _ = p.running.Stop() }

// JetStreamCeiling publishes evs asynchronously (bounded in flight) and then
// consumes them with Fetch and individual acks, returning each rate: the raw
// broker cost of the same events the pipeline carries.
func JetStreamCeiling(ctx context.Context, js jetstream.JetStream, topo events.Topology, evs []*events.TokenIssued) (publish, consume float64, err error) {
	start := time.Now()
	if err := Fill(ctx, js, topo, evs, nil); err != nil {
		return 0, 0, err
	}
	publish = float64(len(evs)) / time.Since(start).Seconds()
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	if err != nil {
		return 0, 0, err
	}
	start = time.Now()
	got := 0
	for got < len(evs) {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			return 0, 0, err
		}
		for m := range batch.Messages() {
			if err := m.Ack(); err != nil {
				return 0, 0, fmt.Errorf("ack: %w", err)
			}
			got++
		}
	}
	return publish, float64(got) / time.Since(start).Seconds(), nil
}

// RampOptions are the ramp settings every end-to-end scenario uses.
func RampOptions(lagBound time.Duration, stepDur time.Duration, start, step, max float64) *loadgen.Ramp {
	return &loadgen.Ramp{Start: start, Step: step, Max: max, StepDuration: stepDur, LagBound: lagBound, ErrorBound: 0.01}
}
