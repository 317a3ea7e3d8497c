package pages_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/app"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
	"github.com/tokenpipe/tokenpipe/internal/throttle"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const (
	alicePassword = "alice's long password"
	bobPassword   = "bob's long password"
	adminPassword = "the admin's password"
	// perUserSource is the throttle's free wrong passwords per (user,
	// address) in these tests.
	perUserSource = 3
)

// env is a real issuer (async mode, real Postgres and JetStream) with a
// persister and recovery, users alice and bob, admin "ops", and client
// "mobile" allowed password and refresh_token.
type env struct {
	base   string
	p      *pipetest.Pipeline
	secret string // mobile's
}

func newEnv(t *testing.T) *env {
	t.Helper()
	p := pipetest.New(t)
	p.Start(t, 1)
	ctx := context.Background()
	testenv.Must(t, clients.AddUser(ctx, p.Pool, "alice", alicePassword, 4), "add alice")
	testenv.Must(t, clients.AddUser(ctx, p.Pool, "bob", bobPassword, 4), "add bob")
	testenv.Must(t, clients.AddUser(ctx, p.Pool, "ops", adminPassword, 4), "add ops")
	secret, err := clients.Add(ctx, p.Pool, "mobile", []string{"profile", "email"}, []string{"password", "refresh_token"})
	testenv.Must(t, err, "add mobile")
	// Loopback is a trusted proxy, so a test can say X-Forwarded-Proto:
	// https and see what the pages do under TLS.
	trusted, err := proxy.Parse("127.0.0.1/32")
	testenv.Must(t, err, "trusted proxies")
	cfg := issuer.Config{
		TokenTTL: time.Hour, RefreshTTL: 24 * time.Hour, Topology: p.Topo, Keys: testenv.Keys(),
		CoalesceWindow: -1, Instance: "pages-test", AdminUsers: []string{"ops"}, TrustedProxies: trusted,
		Login: throttle.Config{PerUserSource: perUserSource, PerUser: 50, PerSource: 50,
			Backoff: time.Minute, MaxBackoff: time.Hour, Memory: time.Hour},
	}
	js, err := issuer.NewJetStream(p.JS.Conn(), cfg)
	testenv.Must(t, err, "jetstream")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	pl := app.StartPipeline(context.Background(), p.Pool, js, app.PipelineConfig{
		Issuer: &cfg, Clients: clients.NewRegistry(p.Pool, time.Minute), NC: p.JS.Conn(), Listener: ln,
		IssuerGrace: 5 * time.Second, Metrics: prometheus.NewRegistry(), Log: testenv.Logger(t),
	})
	t.Cleanup(func() { _ = pl.Stop() })
	return &env{base: "http://" + ln.Addr().String(), p: p, secret: secret}
}

// call posts a form to an OAuth endpoint as client mobile and decodes the
// JSON answer.
func (e *env) call(t *testing.T, path string, form url.Values) (int, map[string]any) {
	t.Helper()
	r, _ := http.NewRequest(http.MethodPost, e.base+path, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.SetBasicAuth("mobile", e.secret)
	resp, err := http.DefaultClient.Do(r)
	testenv.Must(t, err, path)
	defer resp.Body.Close()
	var body map[string]any
	testenv.Must(t, json.NewDecoder(resp.Body).Decode(&body), "decode "+path)
	return resp.StatusCode, body
}

// signInApp has mobile sign user in (password grant) and waits until the
// token's row is written, so the application is listed. It returns the
// access and refresh token.
func (e *env) signInApp(t *testing.T, user, pass string) (string, string) {
	t.Helper()
	status, body := e.call(t, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {user}, "password": {pass}, "scope": {"profile"}})
	if status != 200 {
		t.Fatalf("password grant for %s = %d %v", user, status, body)
	}
	e.p.Drained(t)
	return body["access_token"].(string), body["refresh_token"].(string)
}

func (e *env) active(t *testing.T, token string) bool {
	t.Helper()
	status, body := e.call(t, "/oauth2/introspect", url.Values{"token": {token}})
	if status != 200 {
		t.Fatalf("introspect = %d %v", status, body)
	}
	return body["active"] == true
}

// browser is a cookie-keeping HTTP client that does not follow redirects,
// so tests see every Location.
type browser struct {
	t      *testing.T
	e      *env
	c      *http.Client
	header http.Header // added to every request
}

func (e *env) browser(t *testing.T) *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{t: t, e: e, header: http.Header{}, c: &http.Client{Jar: jar,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

type page struct {
	status int
	header http.Header
	body   string
}

func (b *browser) do(method, path string, form url.Values) page {
	b.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	r, _ := http.NewRequest(method, b.e.base+path, body)
	if form != nil {
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range b.header {
		r.Header[k] = v
	}
	resp, err := b.c.Do(r)
	testenv.Must(b.t, err, method+" "+path)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	testenv.Must(b.t, err, "read "+path)
	return page{status: resp.StatusCode, header: resp.Header, body: string(raw)}
}

func (b *browser) get(path string) page                   { return b.do(http.MethodGet, path, nil) }
func (b *browser) post(path string, form url.Values) page { return b.do(http.MethodPost, path, form) }

var csrfField = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf is the CSRF token of the first form on a page.
func (p page) csrf(t *testing.T) string {
	t.Helper()
	m := csrfField.FindStringSubmatch(p.body)
	if m == nil {
		t.Fatalf("no csrf field on the page (%d): %s", p.status, p.body)
	}
	return m[1]
}

// signIn signs in at area ("/account" or "/admin") through its form and
// returns the page the redirect leads to.
func (b *browser) signIn(area, user, pass string) page {
	b.t.Helper()
	form := b.get(area)
	got := b.post(area+"/signin", url.Values{"csrf": {form.csrf(b.t)}, "username": {user}, "password": {pass}})
	if got.status != http.StatusSeeOther || got.header.Get("Location") != area {
		b.t.Fatalf("sign-in of %s at %s = %d %q: %s", user, area, got.status, got.header.Get("Location"), got.body)
	}
	return b.get(area)
}

// cookie returns the value of the named cookie for the issuer's path.
func (b *browser) cookie(path, name string) string {
	u, _ := url.Parse(b.e.base + path)
	for _, c := range b.c.Jar.Cookies(u) {
		if c.Name == name {
			return c.Value
		}
	}
	return ""
}

// setCookie plants a cookie as an attacker or a tampering user would.
func (b *browser) setCookie(path, name, value string) {
	u, _ := url.Parse(b.e.base + path)
	b.c.Jar.SetCookies(u, []*http.Cookie{{Name: name, Value: value, Path: path}})
}
