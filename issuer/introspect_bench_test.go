package issuer_test

import (
	"context"
	"encoding/json"
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
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/consume"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
	"github.com/tokenpipe/tokenpipe/persister"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// The load BenchmarkIntrospectUnderLoad puts on the issuer.
const (
	ibWorkingSet    = 2000 // tokens with rows, introspected over and over
	ibRevoked       = 20   // of the working set, revoked before measuring
	ibIntrospectors = 8    // resource servers, one keep-alive connection each
	ibIssuers       = 8    // background token requesters
	ibIssueRate     = 1000 // background tokens per second, open loop
	ibLoadScopes    = 256  // background keys are pairs of these: 32,640 keys
	ibWarmup        = 2 * time.Second
)

// Share of introspections, in percent, by the kind of token asked about. The
// rest ask about unknown tokens: tampered, garbage or expired.
const (
	ibPctWorking = 90 // working set: cache hits, a database read every cache TTL
	ibPctFresh   = 5  // just issued: usually no row yet, so always the database
	ibPctRevoked = 3  // revoked: a cached negative answer
)

// BenchmarkIntrospectUnderLoad measures POST /oauth2/introspect latency while
// the async pipeline is busy: an issuer over a fresh database and stream, a
// real persister pool and recovery writing rows from that stream, and a
// background load of ibIssueRate token requests per second over HTTP.
//
// Each op is one introspection, sent by one of ibIntrospectors closed-loop
// clients over keep-alive connections, and timed from request to decoded
// answer into an HDR histogram. b.Loop sets the count, so run it with a fixed
// number of introspections; setup (about 5 seconds) runs once per -count:
//
//	go test -run '^$' -bench IntrospectUnderLoad -benchtime 20000x -count 5 ./issuer/
//
// Before measuring, ibWorkingSet tokens of distinct keys are issued, left to
// the persister until every one has its row, and ibRevoked of them revoked;
// the background load then runs for ibWarmup while every working-set token is
// introspected once. Every answer is checked: working-set and just-issued
// tokens must be active with their own scope, revoked and unknown ones
// inactive; any other answer fails the benchmark.
//
// Metrics: p50_ms, p99_ms, p999_ms and max_ms of the introspections;
// introspections/s; issued/s, the background issue rate achieved, and
// rows/s, the rows the persister committed, both over the measured window;
// cache_% and db_%, where the issuer says its answers came from
// (tokenpipe_issuer_introspect_duration_seconds by source; the rest were
// invalid or expired tokens, answered without a lookup).
func BenchmarkIntrospectUnderLoad(b *testing.B) {
	e := newIntrospectBenchEnv(b)
	ctx := context.Background()
	base := e.srv.URL

	wsScopes := make([]string, ibWorkingSet)
	for i := range wsScopes {
		wsScopes[i] = fmt.Sprintf("w%04d", i)
	}
	wsSecret, err := clients.Add(ctx, e.pool, "ws", wsScopes, []string{"client_credentials"})
	testenv.Must(b, err, "add working-set client")
	loadScopes := make([]string, ibLoadScopes)
	for i := range loadScopes {
		loadScopes[i] = fmt.Sprintf("s%03d", i)
	}
	loadSecret, err := clients.Add(ctx, e.pool, "load", loadScopes, []string{"client_credentials"})
	testenv.Must(b, err, "add load client")
	rsSecret, err := clients.AddWith(ctx, e.pool, "rs", []string{"read"}, []string{"client_credentials"}, clients.Options{Introspect: true})
	testenv.Must(b, err, "add resource server client")

	// The working set: one token per scope, so every token is its own key
	// and stays ACTIVE; no background token shares a key with it.
	setup := ibHTTPClient(ibIssuers)
	defer setup.CloseIdleConnections()
	working := make([]string, ibWorkingSet)
	testenv.Must(b, ibParallel(ibIssuers, ibWorkingSet, func(i int) error {
		var err error
		working[i], err = ibIssue(setup, base, "ws", wsSecret, wsScopes[i])
		return err
	}), "issue the working set")
	testenv.Eventually(b, 60*time.Second, "every working-set token to have its row", func() (bool, error) {
		var n int
		err := e.pool.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE client_id = 'ws' AND state = 'ACTIVE'`).Scan(&n)
		return n == ibWorkingSet, err
	})
	revoked := working[:ibRevoked]
	working = working[ibRevoked:]
	wsScopes = wsScopes[ibRevoked:]
	for _, tok := range revoked {
		r := ibForm(base+"/oauth2/revoke", "token="+url.QueryEscape(tok), "ws", wsSecret)
		resp, err := setup.Do(r)
		testenv.Must(b, err, "revoke")
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("revoke answered %d", resp.StatusCode)
		}
	}
	unknown := ibUnknownTokens(b, working)

	// The background load: a pacer hands out ibIssueRate jobs a second and
	// counts those no requester was free to take; each job is a token of a
	// key fresh for the run (a pair of scopes).
	var pairs []string
	for i := range ibLoadScopes {
		for j := i + 1; j < ibLoadScopes; j++ {
			pairs = append(pairs, loadScopes[i]+" "+loadScopes[j])
		}
	}
	load := &ibLoad{}
	loadCtx, stopLoad := context.WithCancel(ctx)
	var loadWG sync.WaitGroup
	jobs := make(chan int, ibIssuers)
	loadWG.Add(1)
	go func() {
		defer loadWG.Done()
		defer close(jobs)
		start := time.Now()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		next := 0
		for {
			select {
			case <-loadCtx.Done():
				return
			case <-tick.C:
			}
			for due := int(time.Since(start).Seconds() * ibIssueRate); next < due; next++ {
				select {
				case jobs <- next:
				default:
					load.behind.Add(1)
				}
			}
		}
	}()
	loader := ibHTTPClient(ibIssuers)
	defer loader.CloseIdleConnections()
	for range ibIssuers {
		loadWG.Add(1)
		go func() {
			defer loadWG.Done()
			for n := range jobs {
				tok, err := ibIssue(loader, base, "load", loadSecret, pairs[n%len(pairs)])
				if err != nil {
					if loadCtx.Err() == nil {
						load.failed.Add(1)
						load.fail(err)
					}
					continue
				}
				load.push(tok)
				load.issued.Add(1)
			}
		}()
	}
	defer func() { stopLoad(); loadWG.Wait() }()

	// The resource servers.
	rs := ibHTTPClient(ibIntrospectors)
	defer rs.CloseIdleConnections()
	var bad ibFailures
	check := func(kind, tok string, want bool, scope, client string) time.Duration {
		start := time.Now()
		ans, err := ibIntrospect(rs, base, rsSecret, tok)
		took := time.Since(start)
		switch {
		case err != nil:
			bad.add("%s token: %v", kind, err)
		case ans.Active != want:
			bad.add("%s token introspected active=%v, want %v", kind, ans.Active, want)
		case want && (ans.ClientID != client || (scope != "" && ans.Scope != scope)):
			bad.add("%s token introspected as client %q scope %q, want %q %q", kind, ans.ClientID, ans.Scope, client, scope)
		case !want && (ans.ClientID != "" || ans.Scope != ""):
			bad.add("inactive %s token introspected with claims: %+v", kind, ans)
		}
		return took
	}
	ask := func(rng *rand.Rand) time.Duration {
		switch p := rng.IntN(100); {
		case p < ibPctWorking:
			i := rng.IntN(len(working))
			return check("working-set", working[i], true, wsScopes[i], "ws")
		case p < ibPctWorking+ibPctFresh:
			if tok := load.recent(rng); tok != "" {
				return check("just-issued", tok, true, "", "load")
			}
			i := rng.IntN(len(working))
			return check("working-set", working[i], true, wsScopes[i], "ws")
		case p < ibPctWorking+ibPctFresh+ibPctRevoked:
			return check("revoked", revoked[rng.IntN(len(revoked))], false, "", "")
		default:
			return check("unknown", unknown[rng.IntN(len(unknown))], false, "", "")
		}
	}

	// Warm up under load: every working-set and revoked token once, so the
	// cache holds what a long-running issuer's would.
	warmStart := time.Now()
	all := append(append([]string{}, revoked...), working...)
	testenv.Must(b, ibParallel(ibIntrospectors, len(all), func(i int) error {
		if i < len(revoked) {
			check("revoked", all[i], false, "", "")
		} else {
			check("working-set", all[i], true, wsScopes[i-len(revoked)], "ws")
		}
		return nil
	}), "warm up")
	time.Sleep(max(0, ibWarmup-time.Since(warmStart)))
	if err := bad.err(); err != nil {
		b.Fatalf("warm-up: %v", err)
	}
	if err := load.err(); err != nil {
		b.Fatalf("background load failed during warm-up: %v", err)
	}

	// Measure.
	sourcesBefore := ibSources(b, e.reg)
	rowsBefore := ibRows(b, e)
	issuedBefore := load.issued.Load()
	hists := make([]*hdrhistogram.Histogram, ibIntrospectors)
	ops := make(chan struct{})
	var wg sync.WaitGroup
	for w := range hists {
		hists[w] = hdrhistogram.New(1, 10_000_000, 3)
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(w)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range ops {
				_ = hists[w].RecordValue(ask(rng).Microseconds())
			}
		}()
	}
	start := time.Now()
	for b.Loop() {
		ops <- struct{}{}
	}
	close(ops)
	wg.Wait()
	elapsed := time.Since(start)
	issued := load.issued.Load() - issuedBefore
	rows := ibRows(b, e) - rowsBefore
	sourcesAfter := ibSources(b, e.reg)

	if err := bad.err(); err != nil {
		b.Fatal(err)
	}
	if n, err := load.failed.Load(), load.err(); err != nil {
		b.Fatalf("%d background token requests failed: %v", n, err)
	}
	h := hists[0]
	for _, o := range hists[1:] {
		h.Merge(o)
	}
	ms := func(q float64) float64 { return float64(h.ValueAtQuantile(q)) / 1000 }
	b.ReportMetric(ms(50), "p50_ms")
	b.ReportMetric(ms(99), "p99_ms")
	b.ReportMetric(ms(99.9), "p999_ms")
	b.ReportMetric(float64(h.Max())/1000, "max_ms")
	b.ReportMetric(float64(h.TotalCount())/elapsed.Seconds(), "introspections/s")
	b.ReportMetric(float64(issued)/elapsed.Seconds(), "issued/s")
	b.ReportMetric(float64(rows)/elapsed.Seconds(), "rows/s")
	cache := sourcesAfter["cache"] - sourcesBefore["cache"]
	db := sourcesAfter["database"] - sourcesBefore["database"]
	if total := float64(h.TotalCount()); total > 0 {
		b.ReportMetric(100*float64(cache)/total, "cache_%")
		b.ReportMetric(100*float64(db)/total, "db_%")
	}
	if behind := load.behind.Load(); behind > 0 {
		b.Logf("background load fell behind: %d token requests not sent on time", behind)
	}
}

// newIntrospectBenchEnv is newEnv in async mode for a benchmark, with a
// persister pool and recovery running on the stream until the benchmark
// ends. The workers have their own NATS connection, as their own process
// would.
func newIntrospectBenchEnv(b *testing.B) *env {
	b.Helper()
	_, pool := testenv.Database(b)
	nc, _, topo := testenv.JetStream(b)
	cfg := config(topo, issuer.ModeAsync)
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(b, err, "jetstream")
	e := &env{pool: pool, js: js, topo: topo, reg: prometheus.NewRegistry(), logs: &lockedBuffer{}}
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))

	wnc, err := nats.Connect(testenv.NATSURL(), nats.Name("tokenpipe-bench-workers"))
	testenv.Must(b, err, "connect workers")
	wjs, err := jetstream.New(wnc)
	testenv.Must(b, err, "workers jetstream")
	runCtx, stop := context.WithCancel(context.Background())
	settings := func(workers int) consume.Settings {
		return consume.Settings{
			Pool:  consume.Config{Workers: workers, BatchSize: 500, BatchWait: 20 * time.Millisecond},
			Retry: store.DefaultRetryPolicy(), Topology: topo, Finish: 10 * time.Second, NakDelay: time.Second,
		}
	}
	roles := []func(context.Context) error{
		persister.New(settings(4), pool, wjs, log, persister.NewMetrics(e.reg)).Run,
		recovery.New(settings(1), pool, wjs, log, recovery.NewMetrics(e.reg)).Run,
	}
	var wg sync.WaitGroup
	for _, run := range roles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := run(runCtx); err != nil {
				log.Error("worker stopped", "err", err)
			}
		}()
	}
	b.Cleanup(func() { stop(); wg.Wait(); wnc.Close() })

	e.iss = issuer.New(cfg, clients.NewRegistry(pool, time.Minute), nc, js, pool, log, issuer.NewMetrics(e.reg))
	unwatch, err := e.iss.WatchNotices()
	testenv.Must(b, err, "watch notices")
	b.Cleanup(unwatch)
	e.srv = httptest.NewServer(e.iss.Handler())
	b.Cleanup(e.srv.Close)
	b.Cleanup(func() {
		if b.Failed() {
			logs := e.logs.String()
			b.Logf("issuer and worker log (last 8 KiB):\n%s", logs[max(0, len(logs)-8192):])
		}
	})
	return e
}

// ibLoad is the background token load and its most recent tokens.
type ibLoad struct {
	issued, failed, behind atomic.Int64
	ibFailures

	mu   sync.Mutex
	ring [64]string
	next int
}

func (l *ibLoad) push(tok string) {
	l.mu.Lock()
	l.ring[l.next%len(l.ring)] = tok
	l.next++
	l.mu.Unlock()
}

// recent returns one of the eight tokens issued last, or "" before any.
func (l *ibLoad) recent(rng *rand.Rand) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.next == 0 {
		return ""
	}
	back := rng.IntN(min(8, l.next)) + 1
	return l.ring[(l.next-back)%len(l.ring)]
}

// ibFailures keeps the first failure seen by any goroutine.
type ibFailures struct {
	once  sync.Once
	first atomic.Pointer[error]
}

func (f *ibFailures) add(format string, args ...any) { f.fail(fmt.Errorf(format, args...)) }

func (f *ibFailures) fail(err error) { f.once.Do(func() { f.first.Store(&err) }) }

func (f *ibFailures) err() error {
	if p := f.first.Load(); p != nil {
		return *p
	}
	return nil
}

// ibHTTPClient keeps up to conns connections alive to the issuer.
func ibHTTPClient(conns int) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxIdleConns: conns, MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, IdleConnTimeout: time.Minute,
	}}
}

func ibForm(target, body, id, secret string) *http.Request {
	r, _ := http.NewRequest(http.MethodPost, target, strings.NewReader(body))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	basic(id, secret)(r)
	return r
}

// ibIssue requests a client_credentials token for scope.
func ibIssue(c *http.Client, base, id, secret, scope string) (string, error) {
	resp, err := c.Do(ibForm(base+"/oauth2/token", "grant_type=client_credentials&scope="+url.QueryEscape(scope), id, secret))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var ans struct {
		AccessToken string `json:"access_token"`
		Error       string `json:"error"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ans); err != nil || resp.StatusCode != http.StatusOK || ans.AccessToken == "" {
		return "", fmt.Errorf("token request answered %d %q (%v)", resp.StatusCode, ans.Error, err)
	}
	return ans.AccessToken, nil
}

type ibAnswer struct {
	Active   bool   `json:"active"`
	ClientID string `json:"client_id"`
	Scope    string `json:"scope"`
}

// ibIntrospect asks about tok as resource server "rs".
func ibIntrospect(c *http.Client, base, secret, tok string) (ibAnswer, error) {
	var ans ibAnswer
	resp, err := c.Do(ibForm(base+"/oauth2/introspect", "token="+url.QueryEscape(tok), "rs", secret))
	if err != nil {
		return ans, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, resp.Body)
		return ans, fmt.Errorf("introspection answered %d", resp.StatusCode)
	}
	err = json.NewDecoder(resp.Body).Decode(&ans)
	_, _ = io.Copy(io.Discard, resp.Body)
	return ans, err
}

// ibParallel runs f(0..n-1) on workers goroutines and returns the first error.
func ibParallel(workers, n int, f func(i int) error) error {
	var next atomic.Int64
	var failed ibFailures
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					failed.fail(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return failed.err()
}

// ibUnknownTokens returns tokens that must introspect inactive without a
// lookup: working-set tokens with one character changed, garbage, and
// well-signed tokens that expired.
func ibUnknownTokens(b *testing.B, working []string) []string {
	var out []string
	for i := range 32 {
		tok := []byte(working[i])
		mid := len(tok) / 2
		if tok[mid] == 'A' {
			tok[mid] = 'B'
		} else {
			tok[mid] = 'A'
		}
		out = append(out, string(tok), fmt.Sprintf("not-a-token-%d", i))
		past := time.Now().Add(-2 * time.Hour)
		expired, err := testenv.Keys().Encode(tokens.Claims{Kind: tokens.Access, Grant: "client_credentials",
			ClientID: "ws", Subject: "ws", Scope: fmt.Sprintf("w%04d", i), IssuedAt: past, ExpiresAt: past.Add(time.Hour)})
		testenv.Must(b, err, "encode an expired token")
		out = append(out, expired)
	}
	return out
}

// ibSources counts introspections by where the issuer found the answer.
func ibSources(b *testing.B, reg *prometheus.Registry) map[string]uint64 {
	families, err := reg.Gather()
	testenv.Must(b, err, "gather")
	out := map[string]uint64{}
	for _, f := range families {
		if f.GetName() != "tokenpipe_issuer_introspect_duration_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "source" {
					out[l.GetValue()] += m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	return out
}

func ibRows(b *testing.B, e *env) int {
	var n int
	testenv.Must(b, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM tokens`).Scan(&n), "count rows")
	return n
}
