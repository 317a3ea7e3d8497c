package loadgen

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/resource"
)

// RotationOptions configure a run of API requests through resource
// servers that use package resource's middleware, in this process, against
// running issuers: the load per-request rotation puts on the pipeline.
type RotationOptions struct {
	Issuers []string // issuer base URLs; resource server i uses Issuers[i % len]
	Servers int      // resource servers (each its own listener and middleware)
	Rotate  bool     // exchange tokens on every request; false: validate only
	// ClientID and Secret: the devices' client (client_credentials and
	// token exchange, scopes p0000..). Device i holds a token for its own
	// scope pair, so every device is its own key.
	ClientID, Secret string
	// APIClientID and APISecret: the resource servers' introspection client.
	APIClientID, APISecret string
	Devices                int
	Rate                   float64 // API requests per second over all devices
	Duration               time.Duration
	Concurrency            int
	// Window is the issuers' rotation window; Margin is subtracted from it
	// when judging a 401 (the window starts at the issuer's answer, before
	// the device reads it).
	Window, Margin time.Duration
	Pool           *pgxpool.Pool
	JS             jetstream.JetStream
	Stream         string
	Consumers      []string
	DrainTimeout   time.Duration
}

// RotationReport is what a rotation run measured.
type RotationReport struct {
	Rotate       bool
	Sent, OK     int
	Errors       map[string]int
	AchievedRate float64
	HTTP         Percentiles // API request latency, from the scheduled time
	// IssuerCalls counts the resource servers' calls to the issuer by
	// endpoint and status; IssuerP99 is their p99 latency, in ms.
	IssuerCalls map[string]int
	IssuerP99   map[string]float64
	Successors  int // distinct successor tokens handed to devices
	Lag         LagResult
	MaxQueueLag uint64
	// The client-visible check: 401s on a request that presented its
	// device's newest token, or a token whose successor the device had
	// received less than Window - Margin before; and successors older than
	// a token the device already held.
	Refused401, Violations401, Outdated int
	// StaleIgnored: successors in answers to requests that presented a
	// token the device had already replaced; the client's rule ignores them.
	StaleIgnored int
	Audit        *audit.Report
	DrainTime    time.Duration
}

// Clean reports whether the devices saw nothing they should not have and
// every token handed out has its row.
func (r *RotationReport) Clean() bool {
	return r.Violations401 == 0 && r.Outdated == 0 && r.Audit != nil && r.Audit.Clean()
}

// device is one client session: its newest token and when it received the
// successor of each token it held.
type device struct {
	mu       sync.Mutex
	current  string
	order    map[string]int       // token -> its place in the device's chain
	replaced map[string]time.Time // token -> when its successor arrived
}

// take applies the client's rule for Tokenpipe-Next-Token: a successor is
// taken only from the answer to a request that presented the token the
// device holds now. An answer to a request that presented an older token
// can carry only that token's successor, which the device has, or has moved
// on from (stale: ignored). outdated reports a successor the device had
// already moved on from that the rule would have taken: the rule failed.
func (d *device) take(presented, next string, at time.Time) (stale, outdated bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if presented != d.current {
		return true, false
	}
	if _, ok := d.order[next]; ok {
		return false, next != d.current
	}
	d.order[next] = len(d.order)
	d.replaced[d.current] = at
	d.current = next
	return false, false
}

// RunRotation sends API requests open-loop at o.Rate through o.Servers
// resource servers, devices in turn, each request with its device's newest
// token; it follows Tokenpipe-Next-Token.
func RunRotation(ctx context.Context, o RotationOptions) (*RotationReport, error) {
	calls := newCallCounter()
	apis, stop, err := startResourceServers(o, calls)
	if err != nil {
		return nil, err
	}
	defer stop()
	sampler := StartSampler(ctx, o.JS, o.Stream, o.Consumers, 250*time.Millisecond)
	defer sampler.Stop()
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: o.Concurrency, MaxConnsPerHost: o.Concurrency}}
	defer hc.CloseIdleConnections()
	devices, initial, err := signInDevices(ctx, o, hc)
	if err != nil {
		return nil, err
	}
	rep := &RotationReport{Rotate: o.Rotate, Errors: map[string]int{}}
	lat := newHist()
	var tokens []Token // successors, as received
	var mu sync.Mutex
	slots := make(chan struct{}, o.Concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	interval := time.Duration(float64(time.Second) / o.Rate)
	for i := 0; ; i++ {
		due := start.Add(time.Duration(i) * interval)
		if !due.Before(start.Add(o.Duration)) || ctx.Err() != nil {
			break
		}
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		rep.Sent++
		select {
		case slots <- struct{}{}:
		default:
			mu.Lock()
			rep.Errors["dropped: client saturated"]++
			mu.Unlock()
			continue
		}
		dev, api := devices[i%len(devices)], apis[i%len(apis)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			out := callThrough(ctx, hc, api, dev, o)
			mu.Lock()
			defer mu.Unlock()
			rep.account(out, due, lat)
			if out.next != "" {
				tokens = append(tokens, Token{Digest: events.Digest(sha256.Sum256([]byte(out.next))), Sent: out.sent, Received: out.received})
			}
		}()
	}
	wg.Wait()
	rep.AchievedRate = float64(rep.OK) / time.Since(start).Seconds()
	rep.HTTP = Percentiles{P50: ms(lat, 50), P90: ms(lat, 90), P99: ms(lat, 99), P999: ms(lat, 99.9), Max: float64(lat.Max()) / 1000}
	rep.IssuerCalls, rep.IssuerP99 = calls.snapshot()
	return rep, rep.verify(ctx, o, sampler, append(initial, tokens...))
}

func ms(h *hdrhistogram.Histogram, q float64) float64 { return float64(h.ValueAtQuantile(q)) / 1000 }

// outcome is one API request as its device saw it.
type outcome struct {
	status             int
	errKind            string
	next               string
	sent, received     time.Time
	violation, outdate bool
	stale              bool // a successor the device's rule ignored
}

func callThrough(ctx context.Context, hc *http.Client, api string, dev *device, o RotationOptions) outcome {
	dev.mu.Lock()
	token := dev.current
	dev.mu.Unlock()
	out := outcome{sent: time.Now()}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, api+"/api", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	out.received = time.Now()
	if err != nil {
		out.errKind = "transport"
		if errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "Timeout") {
			out.errKind = "timeout"
		}
		return out
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	out.status = resp.StatusCode
	if next := resp.Header.Get(resource.HeaderNextToken); next != "" {
		out.next = next
		out.stale, out.outdate = dev.take(token, next, out.received)
	}
	if out.status == http.StatusUnauthorized {
		dev.mu.Lock()
		replaced, wasReplaced := dev.replaced[token]
		out.violation = !wasReplaced || out.sent.Before(replaced.Add(o.Window-o.Margin))
		dev.mu.Unlock()
	}
	return out
}

func (r *RotationReport) account(out outcome, due time.Time, lat *hdrhistogram.Histogram) {
	switch {
	case out.errKind != "":
		r.Errors[out.errKind]++
		return
	case out.status == http.StatusUnauthorized:
		r.Refused401++
		if out.violation {
			r.Violations401++
		}
	case out.status != http.StatusOK:
		r.Errors[fmt.Sprintf("HTTP %d", out.status)]++
	default:
		r.OK++
		_ = lat.RecordValue(out.received.Sub(due).Microseconds())
	}
	if out.outdate {
		r.Outdated++
	}
	if out.stale {
		r.StaleIgnored++
	}
	if out.next != "" {
		r.Successors++
	}
}

// verify waits for the pipeline to drain and checks every token the
// devices held: one row each, one ACTIVE per key.
func (r *RotationReport) verify(ctx context.Context, o RotationOptions, sampler *Sampler, all []Token) error {
	drainStart := time.Now()
	stream, err := o.JS.Stream(ctx, o.Stream)
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	digests := make([]events.Digest, len(all))
	for i, t := range all {
		digests[i] = t.Digest
	}
	for {
		r.Audit, err = audit.Check(ctx, o.Pool, digests, stream, o.Consumers...)
		if err != nil {
			return err
		}
		if r.Audit.Clean() || time.Since(drainStart) > o.DrainTimeout || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	r.DrainTime = time.Since(drainStart)
	if r.Lag, err = PersistLag(ctx, o.Pool, all, 1); err != nil {
		return err
	}
	for _, q := range sampler.Samples() {
		r.MaxQueueLag = max(r.MaxQueueLag, q.Lag())
	}
	return nil
}

// signInDevices gives each device a client_credentials token for its own
// scope pair.
func signInDevices(ctx context.Context, o RotationOptions, hc *http.Client) ([]*device, []Token, error) {
	devices := make([]*device, o.Devices)
	var initial []Token
	g := New(Target{URL: strings.TrimSuffix(o.Issuers[0], "/") + "/oauth2/token", ClientID: o.ClientID, Secret: o.Secret, ScopePool: 2 * o.Devices}, Mix{}, 16)
	defer g.Close()
	for i := range devices {
		key := fmt.Sprintf("p%04d p%04d", 2*i, 2*i+1)
		tok, errKind := g.request(ctx, key)
		if errKind != "" {
			return nil, nil, fmt.Errorf("sign in device %d: %s", i, errKind)
		}
		devices[i] = &device{current: tok, order: map[string]int{tok: 0}, replaced: map[string]time.Time{}}
		initial = append(initial, Token{Digest: events.Digest(sha256.Sum256([]byte(tok))), Sent: time.Now(), Received: time.Now()})
	}
	return devices, initial, nil
}

// startResourceServers serves a trivial API through the middleware on
// loopback listeners, and returns their base URLs.
func startResourceServers(o RotationOptions, calls *callCounter) ([]string, func(), error) {
	var urls []string
	var servers []*http.Server
	var wg sync.WaitGroup
	stop := func() {
		for _, s := range servers {
			_ = s.Close()
		}
		wg.Wait()
	}
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") })
	for i := range o.Servers {
		base := strings.TrimSuffix(o.Issuers[i%len(o.Issuers)], "/")
		hc := &http.Client{Timeout: 10 * time.Second, Transport: calls.wrap(&http.Transport{MaxIdleConnsPerHost: 256})}
		mw := &resource.Middleware{Validator: &resource.Introspector{URL: base + "/oauth2/introspect",
			ClientID: o.APIClientID, ClientSecret: o.APISecret, HTTP: hc}}
		if o.Rotate {
			mw.Exchanger = &resource.Exchanger{TokenURL: base + "/oauth2/token", Clients: map[string]string{o.ClientID: o.Secret}, HTTP: hc}
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			stop()
			return nil, nil, fmt.Errorf("resource server: %w", err)
		}
		srv := &http.Server{Handler: mw.Wrap(ok), ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, srv)
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = srv.Serve(ln)
		}()
		urls = append(urls, "http://"+ln.Addr().String())
	}
	return urls, stop, nil
}

// callCounter counts the resource servers' calls to the issuer.
type callCounter struct {
	mu    sync.Mutex
	count map[string]int
	hist  map[string]*hdrhistogram.Histogram
}

func newCallCounter() *callCounter {
	return &callCounter{count: map[string]int{}, hist: map[string]*hdrhistogram.Histogram{}}
}

type countingTransport struct {
	next http.RoundTripper
	c    *callCounter
}

func (c *callCounter) wrap(next http.RoundTripper) http.RoundTripper {
	return &countingTransport{next: next, c: c}
}

func (t *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(r)
	endpoint := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	status := "error"
	if err == nil {
		status = fmt.Sprint(resp.StatusCode)
	}
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	t.c.count[endpoint+" "+status]++
	h, ok := t.c.hist[endpoint]
	if !ok {
		h = newHist()
		t.c.hist[endpoint] = h
	}
	_ = h.RecordValue(time.Since(start).Microseconds())
	return resp, err
}

func (c *callCounter) snapshot() (map[string]int, map[string]float64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	counts := make(map[string]int, len(c.count))
	for k, v := range c.count {
		counts[k] = v
	}
	p99 := map[string]float64{}
	for k, h := range c.hist {
		p99[k] = ms(h, 99)
	}
	return counts, p99
}

// WriteSummary prints the report.
func (r *RotationReport) WriteSummary(w io.Writer) {
	fmt.Fprintf(w, "rotation %v: sent %d, ok %d (%.0f/s), errors %v\n", r.Rotate, r.Sent, r.OK, r.AchievedRate, r.Errors)
	fmt.Fprintf(w, "API latency ms: p50 %.1f p90 %.1f p99 %.1f p99.9 %.1f max %.1f\n", r.HTTP.P50, r.HTTP.P90, r.HTTP.P99, r.HTTP.P999, r.HTTP.Max)
	fmt.Fprintf(w, "issuer calls: %v; p99 ms %v\n", r.IssuerCalls, r.IssuerP99)
	fmt.Fprintf(w, "successors handed out: %d; persist lag p50 %s p99 %s max %s (measured %d, unpersisted %d); max queue lag %d; drained in %s\n",
		r.Successors, r.Lag.P50.Round(time.Millisecond), r.Lag.P99.Round(time.Millisecond), r.Lag.Max.Round(time.Millisecond),
		r.Lag.Measured, r.Lag.Unpersisted, r.MaxQueueLag, r.DrainTime.Round(time.Millisecond))
	fmt.Fprintf(w, "client-visible: 401s %d, of which on a newest or in-window token %d; outdated successors taken %d (stale ones ignored by the client's rule: %d)\n",
		r.Refused401, r.Violations401, r.Outdated, r.StaleIgnored)
	verdict := "clean"
	if !r.Clean() {
		verdict = "VIOLATIONS"
	}
	if r.Audit != nil {
		r.Audit.Write(w)
	}
	fmt.Fprintf(w, "client-visible result: %s\n", verdict)
}
