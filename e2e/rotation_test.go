package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/resource"
)

// rotationWindow is the issuers' batch window in TestRotationThroughTwoIssuers:
// short, so that requests cross its edges.
const rotationWindow = time.Second

// TestRotationThroughTwoIssuers runs per-request rotation on the real binary:
// two issuer processes, a persister and a recovery process; a resource server
// (package resource) whose introspections and exchanges alternate between
// the issuers; and two devices (package client), each sending requests from
// ten goroutines at once. Some requests are cancelled while the handler runs,
// some are held longer than the window so that the tokens they presented
// are exchanged, or their window ends, meanwhile. The devices must never
// need a new sign-in (no 401 on the token a device holds, no cancelled
// request costing it), no request within its token's window is refused, and
// every token handed out has its one row with a clean audit.
func TestRotationThroughTwoIssuers(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 3*time.Minute)
	secret, err := clients.Add(ctx, pool, "spa", []string{"profile"}, []string{"password", tokens.GrantTokenExchange})
	testenv.Must(t, err, "add client")
	api, err := clients.AddWith(ctx, pool, "api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	users := []string{"alice", "bob"}
	for _, u := range users {
		testenv.Must(t, clients.AddUser(ctx, pool, u, u+"'s password", 4), "add user")
	}
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_ROTATION_WINDOW="+rotationWindow.String())
	iss1, url1 := d.issuer("issuer-1")
	iss2, url2 := d.issuer("issuer-2")
	d.start("persister", "persister")
	d.start("recovery", "recovery")

	issuers := &roundRobin{hosts: []string{hostOf(t, url1), hostOf(t, url2)}}
	mw := &resource.Middleware{
		// Below the window, as the README says to keep it.
		Validator: &resource.Introspector{URL: strings.TrimSuffix(url1, "/token") + "/introspect",
			ClientID: "api", ClientSecret: api, HTTP: &http.Client{Transport: issuers}, CacheTTL: rotationWindow / 4},
		Exchanger: &resource.Exchanger{TokenURL: url1, Clients: map[string]string{"spa": secret},
			HTTP: &http.Client{Transport: issuers}},
	}
	srv := httptest.NewServer(mw.Wrap(http.HandlerFunc(slowHandler)))
	t.Cleanup(srv.Close)

	var devices []*rotationDevice
	for _, u := range users {
		devices = append(devices, newRotationDevice(t, url1, secret, u))
	}
	var wg sync.WaitGroup
	var failures atomic.Int64
	for _, dev := range devices {
		for g := range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := dev.run(ctx, srv.URL, g, 8); err != nil {
					failures.Add(1)
					t.Errorf("%s, goroutine %d: %v", dev.user, g, err)
				}
			}()
		}
	}
	wg.Wait()
	if failures.Load() > 0 {
		return
	}

	var digests []events.Digest
	successors := 0
	for _, dev := range devices {
		rep := dev.rec.judge()
		t.Logf("%s: %d requests, %d cancelled, %d answers with a successor, %d refused (401) after their window",
			dev.user, rep.requests, dev.cancelled.Load(), rep.successors, rep.lateRefusals)
		if rep.cancelledSeen == 0 || rep.requests == 0 {
			t.Errorf("%s: the run exercised nothing: %+v", dev.user, rep)
		}
		if rep.newestRefused > 0 || rep.windowRefused > 0 {
			t.Errorf("%s: %d requests refused (401) that presented the newest token, %d within its window",
				dev.user, rep.newestRefused, rep.windowRefused)
		}
		if got := dev.grants.requests(); !slices.Equal(got, []string{"password"}) {
			t.Errorf("%s: token requests %v; want the one sign-in (a refused token or a cancelled request cost the device its token)", dev.user, got)
		}
		digests = append(digests, rep.digests...)
		successors += rep.successors
	}
	if successors == 0 {
		t.Fatal("no request carried a successor: rotation did not run")
	}
	results := map[string]int{}
	for _, p := range []*proc{iss1, iss2} {
		for _, r := range []string{"first", "repeat", "refused", "reuse"} {
			results[r] += exchangeCount(t, scrape(t, p), r)
		}
	}
	// refused: exchanges of a held request after its token's window ended.
	t.Logf("exchanges over both issuers: %v", results)
	if results["reuse"] > 0 || results["first"] == 0 {
		t.Fatalf("exchanges %v: a late exchange from the middleware was taken for reuse, or none ran", results)
	}
	auditUntilClean(t, "per-request rotation, 2 issuers, 2 devices x 10 goroutines", len(digests), digests, pool, js, topo, time.Now())
}

// exchangeCount reads tokenpipe_issuer_token_exchanges_total{result} from
// an issuer's metrics.
func exchangeCount(t *testing.T, metrics, result string) int {
	t.Helper()
	prefix := `tokenpipe_issuer_token_exchanges_total{result="` + result + `"} `
	for _, line := range strings.Split(metrics, "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			n, err := strconv.ParseFloat(v, 64)
			testenv.Must(t, err, "parse "+line)
			return int(n)
		}
	}
	return 0
}

// slowHandler answers after ?hold= (a duration), or, with ?until=cancel,
// only when the client has gone away.
func slowHandler(w http.ResponseWriter, r *http.Request) {
	hold, _ := time.ParseDuration(r.URL.Query().Get("hold"))
	if r.URL.Query().Get("until") == "cancel" {
		hold = time.Minute // bounded: the test's client gives up long before
	}
	if hold > 0 {
		timer := time.NewTimer(hold)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-r.Context().Done():
			return
		}
	}
	_, _ = io.WriteString(w, "ok\n")
}

// roundRobin sends each request to the next of hosts.
type roundRobin struct {
	hosts []string
	n     atomic.Uint64
}

func (rr *roundRobin) RoundTrip(req *http.Request) (*http.Response, error) {
	out := req.Clone(req.Context())
	out.URL.Host = rr.hosts[rr.n.Add(1)%uint64(len(rr.hosts))]
	out.Host = out.URL.Host
	return http.DefaultTransport.RoundTrip(out)
}

func hostOf(t *testing.T, raw string) string {
	u, err := url.Parse(raw)
	testenv.Must(t, err, "parse "+raw)
	return u.Host
}

// rotationDevice is one user's application: one client.Transport shared by
// all its goroutines, as an application shares one http.Client.
type rotationDevice struct {
	user      string
	tr        *client.Transport
	grants    *grantLog
	rec       *rotationRecorder
	cancelled atomic.Int64
}

func newRotationDevice(t *testing.T, tokenURL, secret, user string) *rotationDevice {
	dev := &rotationDevice{user: user, grants: &grantLog{}, rec: &rotationRecorder{replaced: map[string]time.Time{}}}
	dev.tr = client.New(client.Config{
		OAuth2: oauth2.Config{ClientID: "spa", ClientSecret: secret, Scopes: []string{"profile"},
			Endpoint: oauth2.Endpoint{TokenURL: tokenURL}},
		Grant:        client.Password(user, user+"'s password"),
		IssuerClient: &http.Client{Transport: dev.grants},
		Base:         dev.rec,
	})
	t.Cleanup(dev.tr.Close)
	return dev
}

// run sends n requests in turn. Every third request of some goroutines is
// cancelled while the handler holds it; others are held past the window
// edge, or short of it.
func (dev *rotationDevice) run(ctx context.Context, api string, g, n int) error {
	hc := dev.tr.Client()
	for i := range n {
		query := ""
		cancel := false
		switch (g + i) % 6 {
		case 1:
			query = "?until=cancel"
			cancel = true
		case 3:
			query = "?hold=" + (rotationWindow + rotationWindow/5).String() // crosses the edge
		case 5:
			query = "?hold=" + (rotationWindow * 3 / 4).String()
		}
		status, err := dev.call(ctx, hc, api+"/"+query, cancel)
		if err != nil {
			return fmt.Errorf("request %d (%s): %w", i, query, err)
		}
		if !cancel && status != http.StatusOK {
			return fmt.Errorf("request %d (%s): status %d", i, query, status)
		}
	}
	return nil
}

// call sends one request; a cancelling call gives up after the handler has
// had time to start (or not: either is a request cancelled mid-way).
func (dev *rotationDevice) call(ctx context.Context, hc *http.Client, target string, cancel bool) (int, error) {
	rctx, stop := context.WithTimeout(ctx, 30*time.Second)
	defer stop()
	if cancel {
		var c context.CancelFunc
		rctx, c = context.WithTimeout(rctx, rotationWindow/5)
		defer c()
	}
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, target, nil)
	if err != nil {
		return 0, err
	}
	resp, err := hc.Do(req)
	if cancel {
		if err == nil {
			discard(resp)
			return 0, errors.New("a request the handler holds until cancelled was answered")
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			return 0, err
		}
		dev.cancelled.Add(1)
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	discard(resp)
	return resp.StatusCode, nil
}

func discard(resp *http.Response) {
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
}

// rotationRecorder sits under the device's client.Transport and sees every
// request to the resource server and its answer, rotation header included.
type rotationRecorder struct {
	mu       sync.Mutex
	calls    []rotationCall
	replaced map[string]time.Time // token -> when its successor first arrived
	handed   []string             // every token the device held or was handed
}

type rotationCall struct {
	presented      string
	sent, received time.Time
	status         int
	next           string
	cancelled      bool
}

func (rec *rotationRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	presented := strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")
	c := rotationCall{presented: presented, sent: time.Now()}
	resp, err := http.DefaultTransport.RoundTrip(req)
	c.received = time.Now()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.handed = append(rec.handed, presented)
	if err != nil {
		c.cancelled = true
		rec.calls = append(rec.calls, c)
		return nil, err
	}
	c.status = resp.StatusCode
	c.next = resp.Header.Get(resource.HeaderNextToken)
	if c.next != "" {
		rec.handed = append(rec.handed, c.next)
		if _, ok := rec.replaced[presented]; !ok {
			rec.replaced[presented] = c.received
		}
	}
	rec.calls = append(rec.calls, c)
	return resp, nil
}

type rotationJudgement struct {
	requests, cancelledSeen, successors int
	newestRefused, windowRefused        int
	lateRefusals                        int
	digests                             []events.Digest
}

// judge applies the client-visible rule to every answer: a 401 is allowed
// only for a token whose successor the device had received before the
// request was sent, and at least half a window before (the window starts at
// the issuer's answer, earlier than the device reads it; the margin keeps
// a slow machine from flagging a refusal that was right).
func (rec *rotationRecorder) judge() rotationJudgement {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var j rotationJudgement
	for _, c := range rec.calls {
		j.requests++
		if c.cancelled {
			j.cancelledSeen++
			continue
		}
		if c.next != "" {
			j.successors++
		}
		if c.status != http.StatusUnauthorized {
			continue
		}
		replaced, ok := rec.replaced[c.presented]
		switch {
		case !ok || !replaced.Before(c.sent):
			j.newestRefused++
		case c.sent.Before(replaced.Add(rotationWindow / 2)):
			j.windowRefused++
		default:
			j.lateRefusals++
		}
	}
	for _, tok := range rec.handed {
		j.digests = append(j.digests, events.DigestOf(tok))
	}
	return j
}
