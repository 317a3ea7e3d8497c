package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// replicationRuns counts BenchmarkReplicationMode's runs in this process.
var replicationRuns atomic.Int64

// BenchmarkReplicationMode is what synchronous replication costs: in each
// iteration a fresh primary with one streaming standby (fsync on), once
// asynchronous and once synchronous (synchronous_standby_names='*',
// synchronous_commit=on), measures
//   - drain: a stream of 50k events written by one persister process;
//   - end to end: 64 HTTP clients asking an async issuer for 20k tokens
//     back to back, until the last row is committed;
//
// and reports both rates per mode and sync/async ratios of the same run.
// Successive runs (-count) alternate which mode goes first.
//
//	go test -run '^$' -bench ReplicationMode -benchtime 1x -count 4 ./e2e/
func BenchmarkReplicationMode(b *testing.B) {
	benchBinary(b) // built before any clock starts
	for range b.N {
		rates := map[string]float64{}
		// Alternate which mode goes first, so a neighbour's load on the
		// machine does not always fall on the same one.
		modes := []string{"async", "sync"}
		if replicationRuns.Add(1)%2 == 0 {
			modes = []string{"sync", "async"}
		}
		for _, mode := range modes {
			drain, e2e := measureReplicationMode(b, mode == "sync")
			rates[mode+"-drain"], rates[mode+"-e2e"] = drain, e2e
			b.ReportMetric(drain, mode+"-drain-rows/s")
			b.ReportMetric(e2e, mode+"-e2e-tokens/s")
		}
		b.ReportMetric(rates["sync-drain"]/rates["async-drain"], "sync/async-drain")
		b.ReportMetric(rates["sync-e2e"]/rates["async-e2e"], "sync/async-e2e")
	}
}

func measureReplicationMode(b *testing.B, syncRepl bool) (drainRate, e2eRate float64) {
	const drainEvents, e2eTokens, clients = 50000, 20000, 64
	b.StopTimer()
	defer b.StartTimer()
	ha := startHAPair(b, syncRepl, false, true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	pool, err := pgxpool.New(ctx, ha.primary.url())
	testenv.Must(b, err, "pool")
	defer pool.Close()
	_, err = schema.Up(ctx, pool)
	testenv.Must(b, err, "migrate")
	// One key per token, as a scope each: the end-to-end rate is then the
	// persister's, not recovery's superseding older tokens.
	scopes := make([]string, e2eTokens)
	for i := range scopes {
		scopes[i] = fmt.Sprintf("s%05d", i)
	}
	addClient(b, pool, "bench-app", "bench-secret", scopes...)
	_, js, topo := testenv.JetStream(b)
	env := append(os.Environ(), "TOKENPIPE_DATABASE_URL="+ha.url, "TOKENPIPE_NATS_URL="+testenv.NATSURL(),
		"TOKENPIPE_STREAM="+topo.Stream, "TOKENPIPE_SUBJECT_PREFIX="+topo.Prefix,
		"TOKENPIPE_STREAM_MAX_AGE="+topo.MaxAge.String(), "TOKENPIPE_LOG_LEVEL=warn",
		"TOKENPIPE_TOKEN_KEYS="+testenv.KeyText)

	testenv.Must(b, bench.Fill(ctx, js, topo, bench.MakeEvents(drainEvents), nil), "fill")
	start := time.Now()
	startPlain(b, env, "persister")
	waitAcked(b, ctx, js, topo, drainEvents)
	drainRate = drainEvents / time.Since(start).Seconds()

	startPlain(b, env, "recovery")
	httpAddr := freeAddr(b)
	startPlain(b, env, "issuer", "TOKENPIPE_HTTP_ADDR="+httpAddr)
	url := "http://" + httpAddr + "/oauth2/token"
	var next, issued atomic.Int64
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	start = time.Now()
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= e2eTokens; i = next.Add(1) {
				if code, _, err := requestToken(hc, url, "bench-app", "bench-secret", scopes[i-1]); err == nil && code == http.StatusOK {
					issued.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	waitAcked(b, ctx, js, topo, drainEvents+uint64(issued.Load()))
	e2eRate = float64(issued.Load()) / time.Since(start).Seconds()
	b.Logf("%s replication: drain %.0f rows/s; end to end %.0f tokens/s (%d of %d requests answered 200)",
		map[bool]string{false: "async", true: "sync"}[syncRepl], drainRate, e2eRate, issued.Load(), e2eTokens)
	return drainRate, e2eRate
}

// waitAcked waits until the persister has acknowledged n events and holds
// nothing: every one of them has its row committed.
func waitAcked(b *testing.B, ctx context.Context, js jetstream.JetStream, topo events.Topology, n uint64) {
	b.Helper()
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(b, err, "consumer")
	for {
		info, err := cons.Info(ctx)
		testenv.Must(b, err, "consumer info")
		if info.NumPending == 0 && info.NumAckPending == 0 && info.AckFloor.Stream >= n {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// startPlain runs a role from the binary built without the race detector
// and waits until it is ready; the benchmark's cleanup kills it.
func startPlain(b *testing.B, env []string, role string, extra ...string) {
	b.Helper()
	ops := freeAddr(b)
	cmd := exec.Command(benchBinary(b), role)
	cmd.Env = append(append(append([]string{}, env...), "TOKENPIPE_OPS_ADDR="+ops, "TOKENPIPE_INSTANCE="+role), extra...)
	testenv.Must(b, cmd.Start(), "start "+role)
	b.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	for range 600 {
		resp, err := http.Get("http://" + ops + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	b.Fatalf("%s not ready after 30s", role)
}
