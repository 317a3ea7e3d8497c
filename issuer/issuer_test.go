package issuer_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/clients"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

type env struct {
	pool   *pgxpool.Pool
	js     jetstream.JetStream
	topo   events.Topology
	srv    *httptest.Server
	secret string
	narrow string // secret of a client allowed only client_credentials and "read"
}

func config(topo events.Topology, mode string) issuer.Config {
	return issuer.Config{
		Mode: mode, TokenTTL: time.Hour, RefreshTTL: 24 * time.Hour, PublishTimeout: 2 * time.Second,
		SyncConflictRetries: 5, Instance: "test", MaxBodyBytes: 4096, Topology: topo,
	}
}

func newEnv(t *testing.T, mode string) *env {
	t.Helper()
	_, pool := testenv.Database(t)
	nc, _, topo := testenv.JetStream(t)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(256))
	testenv.Must(t, err, "jetstream")
	return startEnv(t, pool, nc, js, topo, mode)
}

func startEnv(t *testing.T, pool *pgxpool.Pool, nc *nats.Conn, js jetstream.JetStream, topo events.Topology, mode string) *env {
	t.Helper()
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "app", []string{"read", "write", "admin"}, []string{"client_credentials", "password"})
	testenv.Must(t, err, "add client")
	narrow, err := clients.Add(ctx, pool, "narrow", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add narrow client")
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "correct horse", 4), "add user")
	s := issuer.New(config(topo, mode), clients.NewRegistry(pool, time.Minute), nc, js, pool, testenv.Logger(t), issuer.NewMetrics(prometheus.NewRegistry()))
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	return &env{pool: pool, js: js, topo: topo, srv: srv, secret: secret, narrow: narrow}
}

type answer struct {
	status int
	header http.Header
	body   map[string]any
}

func (e *env) post(t *testing.T, form url.Values, mutate ...func(*http.Request)) answer {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/oauth2/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for _, m := range mutate {
		m(req)
	}
	return do(t, req)
}

func do(t *testing.T, req *http.Request) answer {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "request")
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var body map[string]any
	if err := json.Unmarshal(raw, &body); err != nil {
		t.Fatalf("answer is not JSON (%d): %q", resp.StatusCode, raw)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: body}
}

func basic(id, secret string) func(*http.Request) {
	return func(r *http.Request) { r.SetBasicAuth(id, secret) }
}

// streamMessages returns every message on the issued subject.
func (e *env) streamMessages(t *testing.T) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	s, err := e.js.Stream(ctx, e.topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := s.Info(ctx)
	testenv.Must(t, err, "info")
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		testenv.Must(t, err, "get msg")
		out = append(out, m)
	}
	return out
}

func TestClientCredentialsBothAuthMethods(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	a := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"write read"}}, basic("app", e.secret))
	b := e.post(t, url.Values{"grant_type": {"client_credentials"}, "client_id": {"app"}, "client_secret": {e.secret}})
	for _, ans := range []answer{a, b} {
		if ans.status != 200 || ans.body["token_type"] != "Bearer" || ans.body["access_token"] == nil {
			t.Fatalf("answer = %d %v", ans.status, ans.body)
		}
		if ans.header.Get("Cache-Control") != "no-store" || !strings.HasPrefix(ans.header.Get("Content-Type"), "application/json") {
			t.Fatalf("headers = %v", ans.header)
		}
		if _, ok := ans.body["refresh_token"]; ok {
			t.Fatal("client_credentials must not issue a refresh token (RFC 6749 4.4.3)")
		}
	}
	if a.body["scope"] != "read write" || b.body["scope"] != "admin read write" {
		t.Fatalf("scopes = %q, %q; want the canonical requested set and the client's full set", a.body["scope"], b.body["scope"])
	}
	msgs := e.streamMessages(t)
	if len(msgs) != 2 {
		t.Fatalf("stream holds %d events, want 2", len(msgs))
	}
	for i, ans := range []answer{a, b} {
		token := ans.body["access_token"].(string)
		digest := events.DigestOf(token)
		if msgs[i].Header.Get(jetstream.MsgIDHeader) != digest.String() {
			t.Fatalf("Nats-Msg-Id = %q, want the token digest", msgs[i].Header.Get(jetstream.MsgIDHeader))
		}
		if strings.Contains(string(msgs[i].Data), token) {
			t.Fatal("the stream holds token plaintext")
		}
		ev, err := events.DecodeTokenIssued(msgs[i].Data)
		testenv.Must(t, err, "decode")
		if ev.TokenDigest != digest || ev.Subject != "app" || ev.ClientID != "app" {
			t.Fatalf("event = %+v", ev)
		}
	}
}

func TestPasswordGrantIssuesRefreshToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	ans := e.post(t, url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"correct horse"}, "scope": {"read"}}, basic("app", e.secret))
	if ans.status != 200 || ans.body["refresh_token"] == nil {
		t.Fatalf("answer = %d %v", ans.status, ans.body)
	}
	msgs := e.streamMessages(t)
	ev, err := events.DecodeTokenIssued(msgs[0].Data)
	testenv.Must(t, err, "decode")
	refresh := ans.body["refresh_token"].(string)
	if ev.Subject != "alice" || ev.RefreshDigest == nil || *ev.RefreshDigest != events.DigestOf(refresh) || strings.Contains(string(msgs[0].Data), refresh) {
		t.Fatalf("event = %+v", ev)
	}
}

func TestBadInputGetsRFC6749ErrorAndWritesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	ok := url.Values{"grant_type": {"client_credentials"}}
	cases := []struct {
		name   string
		req    func() *http.Request
		status int
		code   string
	}{
		{"wrong method", func() *http.Request {
			r, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/oauth2/token", nil)
			return r
		}, 405, "invalid_request"},
		{"wrong content type", func() *http.Request {
			r, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/oauth2/token", strings.NewReader(`{"grant_type":"client_credentials"}`))
			r.Header.Set("Content-Type", "application/json")
			r.SetBasicAuth("app", e.secret)
			return r
		}, 400, "invalid_request"},
		{"malformed body", func() *http.Request { return form(e, "grant_type=%zz", basic("app", e.secret)) }, 400, "invalid_request"},
		{"oversized body", func() *http.Request {
			return form(e, "grant_type=client_credentials&pad="+strings.Repeat("x", 10000), basic("app", e.secret))
		}, 413, "invalid_request"},
		{"missing grant_type", func() *http.Request { return form(e, "scope=read", basic("app", e.secret)) }, 400, "invalid_request"},
		{"unknown grant", func() *http.Request { return form(e, "grant_type=implicit", basic("app", e.secret)) }, 400, "unsupported_grant_type"},
		{"repeated parameter", func() *http.Request {
			return form(e, "grant_type=client_credentials&grant_type=password", basic("app", e.secret))
		}, 400, "invalid_request"},
		{"bad secret", func() *http.Request { return form(e, ok.Encode(), basic("app", "wrong")) }, 401, "invalid_client"},
		{"unknown client", func() *http.Request { return form(e, ok.Encode(), basic("nobody", "x")) }, 401, "invalid_client"},
		{"no credentials", func() *http.Request { return form(e, ok.Encode()) }, 401, "invalid_client"},
		{"two auth methods", func() *http.Request {
			return form(e, ok.Encode()+"&client_secret="+e.secret, basic("app", e.secret))
		}, 400, "invalid_request"},
		{"scope not allowed", func() *http.Request {
			return form(e, "grant_type=client_credentials&scope=read+delete", basic("app", e.secret))
		}, 400, "invalid_scope"},
		{"grant not allowed", func() *http.Request {
			return form(e, "grant_type=password&username=alice&password=correct+horse", basic("narrow", e.narrow))
		}, 400, "unauthorized_client"},
		{"wrong password", func() *http.Request {
			return form(e, "grant_type=password&username=alice&password=nope", basic("app", e.secret))
		}, 400, "invalid_grant"},
		{"secret in query string", func() *http.Request {
			r := form(e, "grant_type=client_credentials&client_id=app")
			r.URL.RawQuery = "client_secret=" + e.secret
			return r
		}, 400, "invalid_request"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ans := do(t, c.req())
			if ans.status != c.status || ans.body["error"] != c.code {
				t.Fatalf("got %d %v, want %d %s", ans.status, ans.body, c.status, c.code)
			}
			if ans.status == 401 && ans.header.Get("WWW-Authenticate") == "" && c.name != "no credentials" {
				t.Fatal("401 to Basic credentials without WWW-Authenticate")
			}
		})
	}
	if msgs := e.streamMessages(t); len(msgs) != 0 {
		t.Fatalf("bad requests published %d events", len(msgs))
	}
	var rows int
	testenv.Must(t, e.pool.QueryRow(context.Background(), "SELECT count(*) FROM tokens").Scan(&rows), "count")
	if rows != 0 {
		t.Fatalf("bad requests wrote %d rows", rows)
	}
}

func form(e *env, body string, mutate ...func(*http.Request)) *http.Request {
	r, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/oauth2/token", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for _, m := range mutate {
		m(r)
	}
	return r
}

// TestNATSDownGives503AndNoToken stops an embedded JetStream server under
// the issuer: the answer is a quick 503 with no token in it. When the server
// comes back on the same port and store, the issuer recovers by itself.
func TestNATSDownGives503AndNoToken(t *testing.T) {
	t.Parallel()
	store := t.TempDir()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: store, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "nats server")
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("embedded NATS not ready")
	}
	port := ns.Addr().(*net.TCPAddr).Port
	_, pool := testenv.Database(t)
	nc, err := nats.Connect(ns.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	testenv.Must(t, err, "connect")
	defer nc.Close()
	js, _ := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(64))
	topo := testenv.Topology()
	_, err = events.Provision(context.Background(), js, topo)
	testenv.Must(t, err, "provision")
	e := startEnv(t, pool, nc, js, topo, issuer.ModeAsync)
	if ans := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret)); ans.status != 200 {
		t.Fatalf("before the outage: %d %v", ans.status, ans.body)
	}
	ns.Shutdown()
	ns.WaitForShutdown()
	start := time.Now()
	ans := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret))
	if ans.status != 503 || ans.body["error"] != "temporarily_unavailable" || ans.body["access_token"] != nil {
		t.Fatalf("during the outage: %d %v", ans.status, ans.body)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("503 took %s; it must come within the publish timeout", took)
	}
	if ans.header.Get("Retry-After") == "" {
		t.Fatal("503 without Retry-After")
	}

	back, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: store, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "restart nats server")
	back.Start()
	defer back.Shutdown()
	if !back.ReadyForConnections(10 * time.Second) {
		t.Fatal("restarted NATS not ready")
	}
	testenv.Eventually(t, 15*time.Second, "issuer answering 200 again", func() (bool, error) {
		return e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret)).status == 200, nil
	})
}

func TestSyncModeRetriesRacesToOneActive(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	e := startEnv(t, pool, nil, nil, testenv.Topology(), issuer.ModeSync)
	const n = 20
	var wg sync.WaitGroup
	codes := make(chan int, n)
	gate := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			codes <- e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret)).status
		}()
	}
	close(gate)
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != 200 {
			t.Fatalf("a sync request answered %d", c)
		}
	}
	var active, rows int
	testenv.Must(t, pool.QueryRow(context.Background(),
		`SELECT count(*) FILTER (WHERE state = 'ACTIVE'), count(*) FROM tokens WHERE client_id = 'app' AND scope = 'read'`).Scan(&active, &rows), "count")
	if active != 1 || rows != n {
		t.Fatalf("active=%d rows=%d, want 1 and %d", active, rows, n)
	}
}

// TestRequireTLSBehindProxy: with RequireTLS, a request that reached the
// issuer over plain HTTP without the proxy's X-Forwarded-Proto: https is
// refused and publishes nothing.
func TestRequireTLSBehindProxy(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	nc, _, topo := testenv.JetStream(t)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(64))
	testenv.Must(t, err, "jetstream")
	ctx := context.Background()
	secret, err := clients.Add(ctx, pool, "tls-app", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "client")
	cfg := config(topo, issuer.ModeAsync)
	cfg.RequireTLS = true
	s := issuer.New(cfg, clients.NewRegistry(pool, time.Minute), nc, js, pool, testenv.Logger(t), issuer.NewMetrics(prometheus.NewRegistry()))
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	e := &env{pool: pool, js: js, topo: topo, srv: srv}
	form := url.Values{"grant_type": {"client_credentials"}}
	plain := e.post(t, form, basic("tls-app", secret))
	if plain.status != 400 || plain.body["error"] != "invalid_request" {
		t.Fatalf("plain HTTP: %d %v", plain.status, plain.body)
	}
	spoofed := e.post(t, form, basic("tls-app", secret), func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", "http") })
	if spoofed.status != 400 {
		t.Fatalf("X-Forwarded-Proto: http accepted: %d", spoofed.status)
	}
	if n := len(e.streamMessages(t)); n != 0 {
		t.Fatalf("refused requests published %d events", n)
	}
	viaProxy := e.post(t, form, basic("tls-app", secret), func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", "https") })
	if viaProxy.status != 200 {
		t.Fatalf("behind a TLS proxy: %d %v", viaProxy.status, viaProxy.body)
	}
}
