package issuer_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
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

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const userPassword = "correct horse"

type env struct {
	pool   *pgxpool.Pool
	js     jetstream.JetStream
	topo   events.Topology
	iss    *issuer.Server
	srv    *httptest.Server
	reg    *prometheus.Registry
	logs   *lockedBuffer
	secret string // "app": client_credentials and password, scopes admin read write
	narrow string // "narrow": client_credentials only, scope read
	plus   string // "svc+1%": an id that HTTP Basic must form-encode
	api    string // "api": a resource server (may introspect every client's tokens), no grants
}

func config(topo events.Topology, mode string) issuer.Config {
	return issuer.Config{
		Mode: mode, TokenTTL: time.Hour, RefreshTTL: 24 * time.Hour, PublishTimeout: 2 * time.Second,
		MaxInFlight: 256, SyncConflictRetries: 5, Instance: "test", MaxBodyBytes: 4096, Topology: topo,
		Keys: testenv.Keys(), CoalesceWindow: -1,
	}
}

// newEnv serves an issuer over a fresh database and, in async mode, a fresh
// stream on the shared test JetStream.
func newEnv(t *testing.T, mode string) *env {
	t.Helper()
	_, pool := testenv.Database(t)
	if mode == issuer.ModeSync {
		return startEnv(t, pool, nil, nil, testenv.Topology(), config(testenv.Topology(), mode))
	}
	nc, _, topo := testenv.JetStream(t)
	cfg := config(topo, mode)
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	return startEnv(t, pool, nc, js, topo, cfg)
}

func startEnv(t *testing.T, pool *pgxpool.Pool, nc *nats.Conn, js jetstream.JetStream, topo events.Topology, cfg issuer.Config) *env {
	t.Helper()
	ctx := context.Background()
	e := &env{pool: pool, js: js, topo: topo, reg: prometheus.NewRegistry(), logs: &lockedBuffer{}}
	var err error
	e.secret, err = clients.Add(ctx, pool, "app", []string{"read", "write", "admin"}, []string{"client_credentials", "password", "refresh_token"})
	testenv.Must(t, err, "add client")
	e.narrow, err = clients.Add(ctx, pool, "narrow", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add narrow client")
	e.plus, err = clients.Add(ctx, pool, "svc+1%", []string{"read"}, []string{"client_credentials"})
	testenv.Must(t, err, "add svc+1% client")
	e.api, err = clients.AddWith(ctx, pool, "api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", userPassword, 4), "add user")
	log := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	// The issuer URL is the test server's own, known once it listens.
	e.srv = httptest.NewUnstartedServer(nil)
	if cfg.IssuerURL == "" {
		cfg.IssuerURL = "http://" + e.srv.Listener.Addr().String()
	}
	e.iss = issuer.New(cfg, clients.NewRegistry(pool, time.Minute), nc, js, pool, log, issuer.NewMetrics(e.reg))
	e.srv.Config.Handler = e.iss.Handler()
	e.srv.Start()
	t.Cleanup(e.srv.Close)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("issuer log:\n%s", e.logs.String())
		}
	})
	return e
}

// lockedBuffer collects log output from concurrent requests.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type answer struct {
	status int
	header http.Header
	body   map[string]any
}

func (a answer) token(t *testing.T) string {
	t.Helper()
	s, ok := a.body["access_token"].(string)
	if !ok {
		t.Fatalf("no access_token in %d %v", a.status, a.body)
	}
	return s
}

func (e *env) post(t *testing.T, form url.Values, mutate ...func(*http.Request)) answer {
	t.Helper()
	return do(t, e.form(form.Encode(), mutate...))
}

func (e *env) form(body string, mutate ...func(*http.Request)) *http.Request {
	r, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/oauth2/token", strings.NewReader(body))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for _, m := range mutate {
		m(r)
	}
	return r
}

func do(t *testing.T, req *http.Request) answer {
	t.Helper()
	a, err := send(req)
	testenv.Must(t, err, "request")
	return a
}

// send is do for goroutines other than the test's, which must not call
// t.Fatal.
func send(req *http.Request) (answer, error) {
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	body := map[string]any{}
	if len(raw) == 0 && resp.StatusCode == http.StatusOK {
		return answer{status: resp.StatusCode, header: resp.Header, body: body}, nil // RFC 7009 success
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		return answer{}, fmt.Errorf("answer is not JSON (%d): %q", resp.StatusCode, raw)
	}
	return answer{status: resp.StatusCode, header: resp.Header, body: body}, nil
}

// basic sets HTTP Basic credentials the RFC 6749 2.3.1 way: id and secret
// form-urlencoded first.
func basic(id, secret string) func(*http.Request) {
	return func(r *http.Request) { r.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret)) }
}

// streamMessages returns every message in the test's stream.
func (e *env) streamMessages(t *testing.T) []*jetstream.RawStreamMsg {
	t.Helper()
	ctx := context.Background()
	s, err := e.js.Stream(ctx, e.topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := s.Info(ctx)
	testenv.Must(t, err, "info")
	var out []*jetstream.RawStreamMsg
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		testenv.Must(t, err, "get msg")
		out = append(out, m)
	}
	return out
}

func (e *env) countRows(t *testing.T) int {
	t.Helper()
	var n int
	testenv.Must(t, e.pool.QueryRow(context.Background(), "SELECT count(*) FROM tokens").Scan(&n), "count rows")
	return n
}

// metric returns the value of a counter, or the sample count of a histogram,
// summed over the series whose labels include the given pairs.
func (e *env) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	families, err := e.reg.Gather()
	testenv.Must(t, err, "gather")
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, l := range m.GetLabel() {
					found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
				}
				if !found {
					continue series
				}
			}
			if h := m.GetHistogram(); h != nil {
				sum += float64(h.GetSampleCount())
			} else {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// rawMessage is everything a stream message carries, for plaintext searches.
func rawMessage(m *jetstream.RawStreamMsg) string {
	var b strings.Builder
	b.WriteString(m.Subject)
	for k, vs := range m.Header {
		b.WriteString(k + ": " + strings.Join(vs, ",") + "\n")
	}
	b.Write(m.Data)
	return b.String()
}

func checkSuccessHeaders(t *testing.T, a answer) {
	t.Helper()
	for k, want := range map[string]string{
		"Content-Type": "application/json;charset=UTF-8", "Cache-Control": "no-store", "Pragma": "no-cache",
	} {
		if got := a.header.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
}

func TestClientCredentialsBothAuthMethods(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	answers := []answer{
		e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"write read read"}}, basic("app", e.secret)),
		e.post(t, url.Values{"grant_type": {"client_credentials"}, "client_id": {"app"}, "client_secret": {e.secret}}),
		e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("svc+1%", e.plus)),
	}
	wantScope := []string{"read write", "admin read write", "read"}
	wantClient := []string{"app", "app", "svc+1%"}
	for i, a := range answers {
		if a.status != 200 || a.body["token_type"] != "Bearer" || a.body["expires_in"] != float64(3600) {
			t.Fatalf("answer %d = %d %v", i, a.status, a.body)
		}
		checkSuccessHeaders(t, a)
		if c, err := testenv.Keys().Decode(a.token(t)); err != nil || c.ClientID != wantClient[i] || c.Scope != wantScope[i] || c.Kind != tokens.Access {
			t.Fatalf("token %d does not verify with its claims: %+v, %v", i, c, err)
		}
		if _, ok := a.body["refresh_token"]; ok {
			t.Fatal("client_credentials must not issue a refresh token (RFC 6749 4.4.3)")
		}
		if a.body["scope"] != wantScope[i] {
			t.Fatalf("scope %d = %q, want %q (the canonical request, or the client's full set without one)", i, a.body["scope"], wantScope[i])
		}
	}
	msgs := e.streamMessages(t)
	if len(msgs) != len(answers) {
		t.Fatalf("stream holds %d events, want %d", len(msgs), len(answers))
	}
	for i, a := range answers {
		token := a.token(t)
		digest := events.DigestOf(token)
		if msgs[i].Subject != e.topo.IssuedSubject() || msgs[i].Header.Get(jetstream.MsgIDHeader) != digest.String() {
			t.Fatalf("event %d on %s with Nats-Msg-Id %q, want %s and the token digest", i, msgs[i].Subject, msgs[i].Header.Get(jetstream.MsgIDHeader), e.topo.IssuedSubject())
		}
		for _, secret := range []string{token, e.secret, e.plus} {
			if strings.Contains(rawMessage(msgs[i]), secret) {
				t.Fatal("the stream holds a token or a client secret in plaintext")
			}
		}
		ev, err := events.DecodeTokenIssued(msgs[i].Data)
		testenv.Must(t, err, "decode")
		if ev.TokenDigest != digest || ev.Subject != wantClient[i] || ev.ClientID != wantClient[i] ||
			ev.Scope() != wantScope[i] || ev.GrantType != "client_credentials" || ev.Instance != "test" ||
			ev.RefreshDigest != nil || ev.ExpiresAt.Sub(ev.IssuedAt) != time.Hour || ev.IssuedAt.Location() != time.UTC {
			t.Fatalf("event %d = %+v", i, ev)
		}
		if strings.Contains(e.logs.String(), token) {
			t.Fatal("the log holds a token")
		}
	}
	if strings.Contains(e.logs.String(), e.secret) {
		t.Fatal("the log holds a client secret")
	}
	if n := e.metric(t, "tokenpipe_issuer_tokens_issued_total", "grant_type", "client_credentials"); n != 3 {
		t.Fatalf("tokens_issued_total = %v, want 3", n)
	}
	if n := e.metric(t, "tokenpipe_http_requests_total", "code", "200"); n != 3 {
		t.Fatalf("http_requests_total{code=200} = %v, want 3", n)
	}
	if n := e.metric(t, "tokenpipe_issuer_publish_duration_seconds"); n != 3 {
		t.Fatalf("publish_duration_seconds count = %v, want 3", n)
	}
}

func TestPasswordGrantIssuesRefreshToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	form := url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {userPassword}, "scope": {"read"}}
	post := url.Values{"client_id": {"app"}, "client_secret": {e.secret}}
	for k, v := range form {
		post[k] = v
	}
	answers := []answer{e.post(t, form, basic("app", e.secret)), e.post(t, post)}
	msgs := e.streamMessages(t)
	if len(msgs) != 2 {
		t.Fatalf("stream holds %d events, want 2", len(msgs))
	}
	for i, a := range answers {
		if a.status != 200 || a.body["scope"] != "read" {
			t.Fatalf("answer %d = %d %v", i, a.status, a.body)
		}
		checkSuccessHeaders(t, a)
		refresh, _ := a.body["refresh_token"].(string)
		if refresh == "" || refresh == a.token(t) {
			t.Fatalf("answer %d has refresh token %q", i, refresh)
		}
		ev, err := events.DecodeTokenIssued(msgs[i].Data)
		testenv.Must(t, err, "decode")
		if ev.Subject != "alice" || ev.ClientID != "app" || ev.GrantType != "password" ||
			ev.TokenDigest != events.DigestOf(a.token(t)) || ev.RefreshDigest == nil || *ev.RefreshDigest != events.DigestOf(refresh) {
			t.Fatalf("event %d = %+v", i, ev)
		}
		for _, plain := range []string{a.token(t), refresh, userPassword, e.secret} {
			if strings.Contains(rawMessage(msgs[i]), plain) || strings.Contains(e.logs.String(), plain) {
				t.Fatal("a token, refresh token, password or secret reached the stream or the log")
			}
		}
	}
}

// TestBadInputGetsRFC6749ErrorAndWritesNothing runs in both modes: in sync
// mode a row would be written inside the request, in async mode an event.
func TestBadInputGetsRFC6749ErrorAndWritesNothing(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{issuer.ModeAsync, issuer.ModeSync} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			testBadInput(t, newEnv(t, mode), mode)
		})
	}
}

func testBadInput(t *testing.T, e *env, mode string) {
	ok := url.Values{"grant_type": {"client_credentials"}}.Encode()
	app := basic("app", e.secret)
	cases := []struct {
		name      string
		req       func() *http.Request
		status    int
		code      string
		challenge bool // WWW-Authenticate expected
	}{
		{"wrong method", func() *http.Request {
			r, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/oauth2/token?grant_type=client_credentials", nil)
			app(r)
			return r
		}, 405, "invalid_request", false},
		{"wrong content type", func() *http.Request {
			r := e.form(`{"grant_type":"client_credentials"}`, app)
			r.Header.Set("Content-Type", "application/json")
			return r
		}, 400, "invalid_request", false},
		{"no content type", func() *http.Request {
			r := e.form(ok, app)
			r.Header.Del("Content-Type")
			return r
		}, 400, "invalid_request", false},
		{"malformed body", func() *http.Request { return e.form("grant_type=%zz", app) }, 400, "invalid_request", false},
		{"oversized body", func() *http.Request {
			return e.form(ok+"&pad="+strings.Repeat("x", 10000), app)
		}, 413, "invalid_request", false},
		{"missing grant_type", func() *http.Request { return e.form("scope=read", app) }, 400, "invalid_request", false},
		{"unknown grant", func() *http.Request { return e.form("grant_type=implicit", app) }, 400, "unsupported_grant_type", false},
		{"repeated parameter", func() *http.Request {
			return e.form(ok+"&grant_type=password", app)
		}, 400, "invalid_request", false},
		{"bad secret (Basic)", func() *http.Request { return e.form(ok, basic("app", "wrong")) }, 401, "invalid_client", true},
		{"bad secret (post)", func() *http.Request {
			return e.form(ok + "&client_id=app&client_secret=wrong")
		}, 401, "invalid_client", true},
		{"unknown client", func() *http.Request { return e.form(ok, basic("nobody", e.secret)) }, 401, "invalid_client", true},
		{"client id not UTF-8", func() *http.Request { return e.form(ok, basic("\xff\xfe", "x")) }, 401, "invalid_client", true},
		{"no credentials", func() *http.Request { return e.form(ok) }, 401, "invalid_client", true},
		{"bearer instead of Basic", func() *http.Request {
			r := e.form(ok)
			r.Header.Set("Authorization", "Bearer abc")
			return r
		}, 401, "invalid_client", true},
		{"two auth methods", func() *http.Request {
			return e.form(ok+"&client_secret="+url.QueryEscape(e.secret), app)
		}, 400, "invalid_request", false},
		{"client_id contradicts Basic", func() *http.Request {
			return e.form(ok+"&client_id=narrow", app)
		}, 400, "invalid_request", false},
		{"scope not allowed", func() *http.Request {
			return e.form(ok+"&scope=read+delete", app)
		}, 400, "invalid_scope", false},
		{"grant not allowed for client", func() *http.Request {
			return e.form("grant_type=password&username=alice&password=correct+horse", basic("narrow", e.narrow))
		}, 400, "unauthorized_client", false},
		{"password grant without password", func() *http.Request {
			return e.form("grant_type=password&username=alice", app)
		}, 400, "invalid_request", false},
		{"wrong password", func() *http.Request {
			return e.form("grant_type=password&username=alice&password=nope", app)
		}, 400, "invalid_grant", false},
		{"unknown user", func() *http.Request {
			return e.form("grant_type=password&username=bob&password=correct+horse", app)
		}, 400, "invalid_grant", false},
		{"secret in query string", func() *http.Request {
			r := e.form(ok + "&client_id=app")
			r.URL.RawQuery = "client_secret=" + url.QueryEscape(e.secret)
			return r
		}, 400, "invalid_request", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a := do(t, c.req())
			if a.status != c.status || a.body["error"] != c.code {
				t.Fatalf("got %d %v, want %d %s", a.status, a.body, c.status, c.code)
			}
			if _, ok := a.body["error_description"].(string); !ok {
				t.Error("no error_description")
			}
			if a.body["access_token"] != nil {
				t.Error("an error answer carries a token")
			}
			if got := a.header.Get("WWW-Authenticate"); (got == `Basic realm="tokenpipe"`) != c.challenge {
				t.Errorf("WWW-Authenticate = %q, want it: %v", got, c.challenge)
			}
			if c.status == 405 && a.header.Get("Allow") != http.MethodPost {
				t.Errorf("405 with Allow %q", a.header.Get("Allow"))
			}
			if a.header.Get("Cache-Control") != "no-store" || a.header.Get("Content-Type") != "application/json;charset=UTF-8" {
				t.Errorf("error headers = %v", a.header)
			}
		})
	}
	if mode == issuer.ModeAsync {
		if msgs := e.streamMessages(t); len(msgs) != 0 {
			t.Fatalf("bad requests published %d events", len(msgs))
		}
	}
	if n := e.countRows(t); n != 0 {
		t.Fatalf("bad requests wrote %d rows", n)
	}
	if n := e.metric(t, "tokenpipe_issuer_tokens_issued_total"); n != 0 {
		t.Fatalf("tokens_issued_total = %v after bad requests only", n)
	}
}

// TestRequireTLSBehindProxy: with RequireTLS, a request that reached the
// issuer over plain HTTP without the proxy's X-Forwarded-Proto: https is
// refused and writes nothing, in either mode.
func TestRequireTLSBehindProxy(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{issuer.ModeAsync, issuer.ModeSync} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			_, pool := testenv.Database(t)
			cfg := config(testenv.Topology(), mode)
			cfg.RequireTLS = true
			var err error
			cfg.TrustedProxies, err = proxy.Parse("127.0.0.0/8, ::1")
			testenv.Must(t, err, "trusted proxies")
			var nc *nats.Conn
			var js jetstream.JetStream
			if mode == issuer.ModeAsync {
				nc, _, cfg.Topology = testenv.JetStream(t)
				js, err = issuer.NewJetStream(nc, cfg)
				testenv.Must(t, err, "jetstream")
			}
			e := startEnv(t, pool, nc, js, cfg.Topology, cfg)
			form := url.Values{"grant_type": {"client_credentials"}}
			plain := e.post(t, form, basic("app", e.secret))
			if plain.status != 400 || plain.body["error"] != "invalid_request" {
				t.Fatalf("plain HTTP: %d %v", plain.status, plain.body)
			}
			spoofed := e.post(t, form, basic("app", e.secret), func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", "http") })
			if spoofed.status != 400 {
				t.Fatalf("X-Forwarded-Proto: http accepted: %d", spoofed.status)
			}
			if mode == issuer.ModeAsync {
				if n := len(e.streamMessages(t)); n != 0 {
					t.Fatalf("refused requests published %d events", n)
				}
			}
			if n := e.countRows(t); n != 0 {
				t.Fatalf("refused requests wrote %d rows", n)
			}
			viaProxy := e.post(t, form, basic("app", e.secret), func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", "https") })
			if viaProxy.status != 200 {
				t.Fatalf("behind a TLS proxy: %d %v", viaProxy.status, viaProxy.body)
			}
		})
	}
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
	t.Cleanup(ns.Shutdown)
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("embedded NATS not ready")
	}
	port := ns.Addr().(*net.TCPAddr).Port
	_, pool := testenv.Database(t)
	nc, err := nats.Connect(ns.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	testenv.Must(t, err, "connect")
	t.Cleanup(nc.Close)
	topo := testenv.Topology()
	cfg := config(topo, issuer.ModeAsync)
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	_, err = events.Provision(context.Background(), js, topo)
	testenv.Must(t, err, "provision")
	e := startEnv(t, pool, nc, js, topo, cfg)
	if a := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret)); a.status != 200 {
		t.Fatalf("before the outage: %d %v", a.status, a.body)
	}
	ns.Shutdown()
	ns.WaitForShutdown()
	for i := range 3 {
		start := time.Now()
		a := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret))
		if a.status != 503 || a.body["error"] != "temporarily_unavailable" || a.body["access_token"] != nil || a.body["refresh_token"] != nil {
			t.Fatalf("request %d during the outage: %d %v", i, a.status, a.body)
		}
		if took := time.Since(start); took > cfg.PublishTimeout+time.Second {
			t.Fatalf("503 took %s; it must come within the publish timeout", took)
		}
		if a.header.Get("Retry-After") != "1" {
			t.Fatal("503 without Retry-After: 1")
		}
	}
	if n := e.metric(t, "tokenpipe_issuer_publish_errors_total"); n != 3 {
		t.Fatalf("publish_errors_total = %v, want 3", n)
	}
	if n := e.metric(t, "tokenpipe_issuer_tokens_issued_total"); n != 1 {
		t.Fatalf("tokens_issued_total = %v, want only the one before the outage", n)
	}

	back, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: store, NoLog: true, NoSigs: true})
	testenv.Must(t, err, "restart nats server")
	back.Start()
	t.Cleanup(back.Shutdown)
	if !back.ReadyForConnections(10 * time.Second) {
		t.Fatal("restarted NATS not ready")
	}
	testenv.Eventually(t, 15*time.Second, "issuer answering 200 again", func() (bool, error) {
		a, err := send(e.form("grant_type=client_credentials", basic("app", e.secret)))
		return err == nil && a.status == 200, err
	})
}

type row struct {
	digest    []byte
	state     string
	scope     string
	streamSeq *int64
	persisted bool
}

func (e *env) rows(t *testing.T) []row {
	t.Helper()
	rs, err := e.pool.Query(context.Background(),
		`SELECT token_digest, state, scope, stream_seq, persisted_at IS NOT NULL FROM tokens ORDER BY issued_at, token_digest`)
	testenv.Must(t, err, "query rows")
	defer rs.Close()
	var out []row
	for rs.Next() {
		var r row
		testenv.Must(t, rs.Scan(&r.digest, &r.state, &r.scope, &r.streamSeq, &r.persisted), "scan")
		out = append(out, r)
	}
	testenv.Must(t, rs.Err(), "rows")
	return out
}

func TestSyncModeLaterTokenIsActive(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeSync)
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {"write read"}}
	first := e.post(t, form, basic("app", e.secret))
	second := e.post(t, form, basic("app", e.secret))
	if first.status != 200 || second.status != 200 {
		t.Fatalf("answers %d %v and %d %v", first.status, first.body, second.status, second.body)
	}
	rows := e.rows(t)
	if len(rows) != 2 {
		t.Fatalf("%d rows, want 2", len(rows))
	}
	want := []struct {
		token, state string
	}{{first.token(t), "INACTIVE"}, {second.token(t), "ACTIVE"}}
	for i, w := range want {
		d := events.DigestOf(w.token)
		r := rows[i]
		if string(r.digest) != string(d[:]) || r.state != w.state || r.scope != "read write" || r.streamSeq != nil || !r.persisted {
			t.Fatalf("row %d = %+v, want digest %s state %s scope %q and no stream_seq", i, r, d, w.state, "read write")
		}
	}
}

func TestSyncModeConcurrentRequestsEndWithOneActive(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeSync)
	const n = 20
	var wg sync.WaitGroup
	answers := make(chan answer, n)
	errs := make(chan error, n)
	gate := make(chan struct{})
	form := url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}.Encode()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			a, err := send(e.form(form, basic("app", e.secret)))
			answers <- a
			errs <- err
		}()
	}
	close(gate)
	wg.Wait()
	close(answers)
	close(errs)
	for err := range errs {
		testenv.Must(t, err, "request")
	}
	for a := range answers {
		if a.status != 200 {
			t.Fatalf("a sync request answered %d %v", a.status, a.body)
		}
	}
	var active, rows int
	testenv.Must(t, e.pool.QueryRow(context.Background(),
		`SELECT count(*) FILTER (WHERE state = 'ACTIVE'), count(*) FROM tokens WHERE client_id = 'app' AND subject = 'app' AND scope = 'read'`).Scan(&active, &rows), "count")
	if active != 1 || rows != n {
		t.Fatalf("active=%d rows=%d, want 1 and %d", active, rows, n)
	}
}

// TestSyncModeRetriesALostRace makes the race happen for certain: another
// writer (as the persister would) holds an uncommitted ACTIVE row for the
// key, so the request's INSERT waits on the unique index and fails with
// 23505 once that commits. The retry must then deactivate the other row.
func TestSyncModeRetriesALostRace(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeSync)
	ctx := context.Background()
	var other events.Digest
	_, _ = rand.Read(other[:])
	tx, err := e.pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer tx.Rollback(ctx)
	_, err = tx.Exec(ctx, `INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
		VALUES ($1, 'app', 'app', 'read', 'ACTIVE', 'client_credentials', now(), now() + interval '1 hour', 1)`, other[:])
	testenv.Must(t, err, "insert the other writer's row")

	type result struct {
		a   answer
		err error
	}
	done := make(chan result, 1)
	go func() {
		a, err := send(e.form("grant_type=client_credentials&scope=read", basic("app", e.secret)))
		done <- result{a, err}
	}()
	testenv.Eventually(t, 10*time.Second, "the request to wait on the unique index", func() (bool, error) {
		var waiting int
		err := e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO tokens%'`).Scan(&waiting)
		return waiting == 1, err
	})
	testenv.Must(t, tx.Commit(ctx), "commit")

	res := <-done
	testenv.Must(t, res.err, "request")
	a := res.a
	if a.status != 200 {
		t.Fatalf("answer %d %v", a.status, a.body)
	}
	mine := events.DigestOf(a.token(t))
	states := map[string]string{}
	for _, r := range e.rows(t) {
		states[string(r.digest)] = r.state
	}
	if len(states) != 2 || states[string(mine[:])] != "ACTIVE" || states[string(other[:])] != "INACTIVE" {
		t.Fatalf("states = %v, want the request's row ACTIVE and the other INACTIVE", states)
	}
	if n := e.metric(t, "tokenpipe_issuer_sync_conflict_retries_total"); n < 1 {
		t.Fatalf("sync_conflict_retries_total = %v, want at least 1", n)
	}
}

// handlerListener reports when the server has read a request's head and its
// handler waits for the rest of the body. net/http drops a connection whose
// head it reads after Shutdown began, so only then is a request in flight.
type handlerListener struct {
	net.Listener
	waiting chan struct{} // one send per connection
}

func (l handlerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &handlerConn{Conn: c, waiting: l.waiting}, nil
}

// handlerConn signals on its second Read: the first returns the head and the
// start of the body in one buffer, so the second comes from the handler
// reading the body.
type handlerConn struct {
	net.Conn
	waiting chan struct{}
	reads   int // only the connection's serving goroutine reads
}

func (c *handlerConn) Read(p []byte) (int, error) {
	c.reads++
	if c.reads == 2 {
		select {
		case c.waiting <- struct{}{}:
		default:
		}
	}
	return c.Conn.Read(p)
}

// TestGracefulShutdownFinishesInFlightRequests cancels Serve while a request
// is half sent: the listener closes at once, but the request still gets its
// token and its event, and Serve then returns cleanly.
func TestGracefulShutdownFinishesInFlightRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	waiting := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- e.iss.ServeListener(ctx, handlerListener{ln, waiting}, 10*time.Second) }()

	conn, err := net.Dial("tcp", ln.Addr().String())
	testenv.Must(t, err, "dial")
	defer conn.Close()
	body := "grant_type=client_credentials&scope=read"
	head := fmt.Sprintf("POST /oauth2/token HTTP/1.1\r\nHost: issuer\r\nContent-Type: application/x-www-form-urlencoded\r\n"+
		"Authorization: Basic %s\r\nContent-Length: %d\r\n\r\n",
		base64.StdEncoding.EncodeToString([]byte("app:"+e.secret)), len(body))
	_, err = io.WriteString(conn, head+body[:10])
	testenv.Must(t, err, "write the first half")
	select {
	case <-waiting:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never started reading the body")
	}

	cancel()
	testenv.Eventually(t, 5*time.Second, "the listener to close", func() (bool, error) {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err != nil, nil
	})
	_, err = io.WriteString(conn, body[10:])
	testenv.Must(t, err, "write the second half")

	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	testenv.Must(t, err, "read the answer")
	defer resp.Body.Close()
	var got map[string]any
	testenv.Must(t, json.NewDecoder(resp.Body).Decode(&got), "decode")
	token, _ := got["access_token"].(string)
	if resp.StatusCode != 200 || token == "" {
		t.Fatalf("in-flight request got %d %v", resp.StatusCode, got)
	}
	select {
	case err := <-served:
		testenv.Must(t, err, "serve")
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the last request")
	}
	msgs := e.streamMessages(t)
	if len(msgs) != 1 || msgs[0].Header.Get(jetstream.MsgIDHeader) != events.DigestOf(token).String() {
		t.Fatalf("stream holds %d events, want the in-flight token's", len(msgs))
	}
}
