package issuer_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/crypto/bcrypt"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/throttle"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// The loads BenchmarkClientCredentialsUnderPasswordAttack puts on the issuer.
const (
	paCCRate      = 250  // client_credentials requests per second, open loop
	paCCWorkers   = 8    // their connections
	paBaseline    = 2000 // client_credentials requests measured before the attack
	paAttackRate  = 200  // wrong-password requests per second, open loop: 10x what filled two cores
	paAttackConns = 64   // the attacker's connections
	paWarmup      = time.Second
)

// BenchmarkClientCredentialsUnderPasswordAttack measures what an online
// password attack does to client_credentials latency. An async issuer over a
// fresh database and stream serves a steady client_credentials load of
// paCCRate requests a second; first paBaseline of them are timed alone
// (the baseline), then an attacker starts sending paAttackRate requests a
// second over paAttackConns connections: wrong passwords for a real user
// (stored at bcrypt's default cost, 10) and for made-up users, to the account
// API and the password grant alike, each from a random address behind a
// trusted proxy (X-Forwarded-For), as a botnet would, so that the per-source
// limits barely help and the bounded password checks do the work. After
// paWarmup, b.Loop's client_credentials requests are timed under attack. Run
// it with as many ops as the baseline:
//
//	go test -run '^$' -bench ClientCredentialsUnderPasswordAttack -benchtime 2000x -count 5 ./issuer/
//
// Latency runs from a request's scheduled send time to its decoded answer,
// so a load that falls behind shows as latency. "protected" runs the
// defaults; "unprotected" lifts the throttle and the bound on concurrent
// password checks, which is how the issuer was before them; its
// client_credentials requests may fail (503 after the publish timeout), and
// are then counted in cc_failed rather than failing the benchmark.
//
// Metrics: base_p50_ms, base_p99_ms, attack_p50_ms, attack_p99_ms and
// p99_ratio (attack_p99 / base_p99) of the client_credentials requests; for
// the attack, over the measured window: checked/s (a password was hashed:
// 401 or invalid_grant), throttled/s (429), busy/s (503, no free password
// check), unsent/s (all paAttackConns connections were waiting) and, for
// "unprotected" only, unanswered/s (no answer within 10 s).
func BenchmarkClientCredentialsUnderPasswordAttack(b *testing.B) {
	b.Run("protected", func(b *testing.B) { benchPasswordAttack(b, true, nil) })
	b.Run("unprotected", func(b *testing.B) {
		benchPasswordAttack(b, false, func(c *issuer.Config) {
			c.PasswordChecks = 1 << 20
			c.Login = throttle.Config{PerUserSource: 1 << 30, PerUser: 1 << 30, PerSource: 1 << 30}
		})
	})
}

// benchPasswordAttack runs the benchmark; strict fails it on any failed
// client_credentials request, else they are only counted (cc_failed).
func benchPasswordAttack(b *testing.B, strict bool, tune func(*issuer.Config)) {
	e := newAttackBenchEnv(b, tune)
	base := e.srv.URL

	// The client_credentials load: a pacer schedules a request every
	// 1/paCCRate s; paCCWorkers send them and time each from its schedule.
	jobs := make(chan time.Time, paBaseline)
	var hist atomic.Pointer[hdrhistogram.Histogram]
	var histMu sync.Mutex
	var ccFail ibFailures
	var ccFailed atomic.Int64
	cc := ibHTTPClient(paCCWorkers)
	defer cc.CloseIdleConnections()
	var ccWG sync.WaitGroup
	for range paCCWorkers {
		ccWG.Add(1)
		go func() {
			defer ccWG.Done()
			for due := range jobs {
				if _, err := ibIssue(cc, base, "narrow", e.narrow, "read"); err != nil {
					ccFailed.Add(1)
					ccFail.fail(err)
					continue
				}
				took := time.Since(due)
				histMu.Lock()
				_ = hist.Load().RecordValue(took.Microseconds())
				histMu.Unlock()
			}
		}()
	}
	defer func() { close(jobs); ccWG.Wait() }()
	tick := time.NewTicker(time.Second / paCCRate)
	defer tick.Stop()
	drain := func() {
		for len(jobs) > 0 {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond) // the last answers
	}

	baseline := hdrhistogram.New(1, 60_000_000, 3)
	hist.Store(baseline)
	for range paBaseline {
		<-tick.C
		jobs <- time.Now()
	}
	drain()

	// The attack.
	attack := &passwordAttack{e: e, strict: strict}
	attackCtx, stopAttack := context.WithCancel(context.Background())
	var attackWG sync.WaitGroup
	attack.start(attackCtx, &attackWG, base)
	defer func() { stopAttack(); attackWG.Wait() }()
	warm := time.NewTimer(paWarmup)
	for warming := true; warming; {
		select {
		case <-warm.C:
			warming = false
		case <-tick.C:
			jobs <- time.Now() // keep the load steady, untimed
		}
	}
	drain()

	underAttack := hdrhistogram.New(1, 60_000_000, 3)
	histMu.Lock()
	hist.Store(underAttack)
	histMu.Unlock()
	before := attack.counts()
	start := time.Now()
	for b.Loop() {
		<-tick.C
		jobs <- time.Now()
	}
	drain()
	elapsed := time.Since(start)
	after := attack.counts()
	stopAttack()

	if err := ccFail.err(); err != nil && strict {
		b.Fatalf("%d client_credentials requests failed: %v", ccFailed.Load(), err)
	}
	if err := attack.failed.err(); err != nil {
		b.Fatalf("attack request answered unexpectedly: %v", err)
	}
	histMu.Lock()
	defer histMu.Unlock()
	ms := func(h *hdrhistogram.Histogram, q float64) float64 { return float64(h.ValueAtQuantile(q)) / 1000 }
	b.ReportMetric(ms(baseline, 50), "base_p50_ms")
	b.ReportMetric(ms(baseline, 99), "base_p99_ms")
	b.ReportMetric(ms(underAttack, 50), "attack_p50_ms")
	b.ReportMetric(ms(underAttack, 99), "attack_p99_ms")
	b.ReportMetric(ms(underAttack, 99)/ms(baseline, 99), "p99_ratio")
	rate := func(i int) float64 { return float64(after[i]-before[i]) / elapsed.Seconds() }
	b.ReportMetric(rate(0), "checked/s")
	b.ReportMetric(rate(1), "throttled/s")
	b.ReportMetric(rate(2), "busy/s")
	b.ReportMetric(rate(3), "unsent/s")
	if !strict {
		b.ReportMetric(rate(4), "unanswered/s")
	}
	b.ReportMetric(float64(ccFailed.Load()), "cc_failed")
}

// newAttackBenchEnv is an async issuer whose trusted proxy is the loopback
// address the attacker and the load come from, with one user, "alice",
// stored at bcrypt's default cost.
func newAttackBenchEnv(b *testing.B, tune func(*issuer.Config)) *env {
	b.Helper()
	ctx := context.Background()
	_, pool := testenv.Database(b)
	nc, _, topo := testenv.JetStream(b)
	cfg := config(topo, issuer.ModeAsync)
	trusted, err := proxy.Parse("127.0.0.1, ::1")
	testenv.Must(b, err, "trusted proxies")
	cfg.TrustedProxies = trusted
	if tune != nil {
		tune(&cfg)
	}
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(b, err, "jetstream")
	e := &env{pool: pool, js: js, topo: topo, reg: prometheus.NewRegistry(), logs: &lockedBuffer{}}
	e.secret, err = clients.Add(ctx, pool, "app", []string{"read"}, []string{"password"})
	testenv.Must(b, err, "add password client")
	e.narrow, err = clients.Add(ctx, pool, "narrow", []string{"read"}, []string{"client_credentials"})
	testenv.Must(b, err, "add client_credentials client")
	testenv.Must(b, clients.AddUser(ctx, pool, "alice", userPassword, bcrypt.DefaultCost), "add user")
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	e.iss = issuer.New(cfg, clients.NewRegistry(pool, time.Minute), nc, js, pool, log, issuer.NewMetrics(e.reg))
	e.srv = httptest.NewServer(e.iss.Handler())
	b.Cleanup(e.srv.Close)
	b.Cleanup(func() {
		if b.Failed() {
			logs := e.logs.String()
			b.Logf("issuer log (last 8 KiB):\n%s", logs[max(0, len(logs)-8192):])
		}
	})
	return e
}

// passwordAttack sends wrong passwords, open loop, and counts the answers.
// Unless strict, requests the issuer did not answer within the client's
// timeout are counted (unanswered/s) rather than failing the benchmark.
type passwordAttack struct {
	e                                            *env
	strict                                       bool
	checked, throttled, busy, unsent, unanswered atomic.Int64
	failed                                       ibFailures
}

func (a *passwordAttack) counts() [5]int64 {
	return [5]int64{a.checked.Load(), a.throttled.Load(), a.busy.Load(), a.unsent.Load(), a.unanswered.Load()}
}

func (a *passwordAttack) start(ctx context.Context, wg *sync.WaitGroup, base string) {
	client := ibHTTPClient(paAttackConns)
	jobs := make(chan int, paAttackConns)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(jobs)
		tick := time.NewTicker(time.Second / paAttackRate)
		defer tick.Stop()
		for n := 0; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			select {
			case jobs <- n:
			default:
				a.unsent.Add(1)
			}
		}
	}()
	for w := range paAttackConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer client.CloseIdleConnections()
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(w)))
			for n := range jobs {
				a.send(ctx, client, base, n, rng)
			}
		}()
	}
}

// send makes one guess: at alice or a made-up user, through the account API
// or the password grant, from a random address.
func (a *passwordAttack) send(ctx context.Context, c *http.Client, base string, n int, rng *rand.Rand) {
	user := "alice"
	if n%2 == 1 {
		user = fmt.Sprintf("user%d", rng.Uint32())
	}
	guess := fmt.Sprintf("guess %d", rng.Uint64())
	var r *http.Request
	if n%4 < 2 {
		r, _ = http.NewRequestWithContext(ctx, http.MethodGet, base+"/account/applications", nil)
		r.SetBasicAuth(user, guess)
	} else {
		body := url.Values{"grant_type": {"password"}, "username": {user}, "password": {guess}}.Encode()
		r, _ = http.NewRequestWithContext(ctx, http.MethodPost, base+"/oauth2/token", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		basic("app", a.e.secret)(r)
	}
	r.Header.Set("X-Forwarded-For", fmt.Sprintf("198.18.%d.%d", rng.IntN(256), rng.IntN(256)))
	resp, err := c.Do(r)
	if err != nil {
		switch {
		case ctx.Err() != nil:
		case a.strict:
			a.failed.fail(err)
		default:
			a.unanswered.Add(1)
		}
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusUnauthorized, http.StatusBadRequest:
		a.checked.Add(1)
	case http.StatusTooManyRequests:
		a.throttled.Add(1)
	case http.StatusServiceUnavailable:
		a.busy.Add(1)
	default:
		a.failed.fail(fmt.Errorf("guess answered %d", resp.StatusCode))
	}
}
