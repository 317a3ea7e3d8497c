package client_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const (
	user     = "alice"
	password = "correct horse"
)

// world is a real issuer over the test's own database and stream, with the
// pipeline (persister and recovery) running, and a resource server that
// introspects every bearer token at the issuer.
type world struct {
	pipe     *pipetest.Pipeline
	issuer   *httptest.Server
	issuer2  *httptest.Server // a second instance over the same database and stream
	secret   string           // client "app": client_credentials, password, refresh_token; scopes read write
	topo     events.Topology
	resource *resourceServer
}

// newWorld starts the world. With unprovisioned, the issuer publishes to a
// stream that does not exist yet (it answers 503 until provision is called),
// and no pipeline runs.
func newWorld(t *testing.T, unprovisioned bool) *world {
	t.Helper()
	ctx := context.Background()
	_, pool := testenv.Database(t)
	nc, js, topo := testenv.JetStream(t)
	w := &world{pipe: &pipetest.Pipeline{Pool: pool, JS: js, Topo: topo}, topo: topo}
	if unprovisioned {
		w.topo = testenv.Topology()
	} else {
		w.pipe.Start(t, 1)
	}
	cfg := issuer.Config{Mode: issuer.ModeAsync, Keys: testenv.Keys(), Topology: w.topo}
	bounded, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	var api string
	w.secret, err = clients.Add(ctx, pool, "app", []string{"read", "write"}, []string{"client_credentials", "password", "refresh_token"})
	testenv.Must(t, err, "add client")
	api, err = clients.AddWith(ctx, pool, "api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	testenv.Must(t, clients.AddUser(ctx, pool, user, password, 4), "add user")
	serve := func(instance string) *httptest.Server {
		cfg.Instance = instance
		iss := issuer.New(cfg, clients.NewRegistry(pool, time.Minute), nc, bounded, pool, testenv.Logger(t), issuer.NewMetrics(prometheus.NewRegistry()))
		stop, err := iss.WatchNotices()
		testenv.Must(t, err, "watch notices")
		t.Cleanup(stop)
		srv := httptest.NewServer(iss.Handler())
		t.Cleanup(srv.Close)
		return srv
	}
	w.issuer, w.issuer2 = serve("issuer-1"), serve("issuer-2")
	w.resource = newResourceServer(t, w.issuer.URL, api)
	return w
}

// provision creates the stream an unprovisioned world's issuer publishes to.
// It may run on another goroutine than the test's: it reports with Errorf.
func (w *world) provision(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := events.Provision(ctx, w.pipe.JS, w.topo); err != nil {
		t.Errorf("provision: %v", err)
	}
	t.Cleanup(func() { _ = w.pipe.JS.DeleteStream(context.Background(), w.topo.Stream) })
}

// oauth2Config is the registration of client "app".
func (w *world) oauth2Config() oauth2.Config {
	return oauth2.Config{ClientID: "app", ClientSecret: w.secret, Scopes: []string{"read"},
		Endpoint: oauth2.Endpoint{TokenURL: w.issuer.URL + "/oauth2/token"}}
}

// device is one installation of the application: a Transport whose token
// requests are recorded and whose log is captured.
type device struct {
	*client.Transport
	issuerLog *issuerLog
	logs      *lockedBuffer
	http      *http.Client
}

func (w *world) device(t *testing.T, grant client.Grant, mutate ...func(*client.Config)) *device {
	t.Helper()
	d := &device{issuerLog: &issuerLog{next: http.DefaultTransport}, logs: &lockedBuffer{}}
	base := &http.Transport{}
	cfg := client.Config{OAuth2: w.oauth2Config(), Grant: grant, Base: base,
		IssuerClient: &http.Client{Transport: d.issuerLog},
		Log:          slog.New(slog.NewJSONHandler(d.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	for _, m := range mutate {
		m(&cfg)
	}
	d.Transport = client.New(cfg)
	d.http = d.Client()
	t.Cleanup(func() {
		d.Close()
		base.CloseIdleConnections()
	})
	return d
}

// get calls the resource server and returns the status and body.
func (d *device) get(t *testing.T, w *world) (int, string) {
	t.Helper()
	resp, err := d.http.Get(w.resource.srv.URL + "/hello")
	testenv.Must(t, err, "get")
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	testenv.Must(t, err, "read body")
	return resp.StatusCode, string(body)
}

// assertNoSecretsLogged fails if the device's log holds any token the issuer
// handed it, the client secret or the user's password.
func (d *device) assertNoSecretsLogged(t *testing.T, w *world) {
	t.Helper()
	logs := d.logs.String()
	if logs == "" {
		t.Fatal("the transport logged nothing: the check would prove nothing")
	}
	for _, s := range append(d.issuerLog.tokens(), w.secret, password) {
		if strings.Contains(logs, s) {
			t.Fatalf("the transport's log holds a secret or token (%d bytes):\n%s", len(s), logs)
		}
	}
}

// issuerLog records the token requests a device sends (grant type, answer
// status) and every token the issuer returns.
type issuerLog struct {
	next     http.RoundTripper
	onAnswer func(status int) // called before the device sees the answer
	onSend   func()           // called before the request is sent

	mu       sync.Mutex
	grants   []string
	statuses []int
	access   []string
	refresh  []string
}

func (l *issuerLog) RoundTrip(req *http.Request) (*http.Response, error) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return nil, err
	}
	form, _ := url.ParseQuery(string(body))
	req.Body = io.NopCloser(bytes.NewReader(body))
	l.mu.Lock()
	l.grants = append(l.grants, form.Get("grant_type"))
	l.mu.Unlock()
	if l.onSend != nil {
		l.onSend()
	}
	resp, err := l.next.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	answer, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(answer))
	var tok struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	_ = json.Unmarshal(answer, &tok)
	l.mu.Lock()
	l.statuses = append(l.statuses, resp.StatusCode)
	if tok.AccessToken != "" {
		l.access = append(l.access, tok.AccessToken)
	}
	if tok.RefreshToken != "" {
		l.refresh = append(l.refresh, tok.RefreshToken)
	}
	l.mu.Unlock()
	if l.onAnswer != nil {
		l.onAnswer(resp.StatusCode)
	}
	return resp, nil
}

// requests returns the grant types of the token requests sent so far.
func (l *issuerLog) requests() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.grants...)
}

// answers returns the statuses of the token requests so far.
func (l *issuerLog) answers() []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]int(nil), l.statuses...)
}

// lastAccess returns the access token the issuer returned last.
func (l *issuerLog) lastAccess(t *testing.T) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.access) == 0 {
		t.Fatal("the issuer returned no access token")
	}
	return l.access[len(l.access)-1]
}

func (l *issuerLog) lastRefresh(t *testing.T) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.refresh) == 0 {
		t.Fatal("the issuer returned no refresh token")
	}
	return l.refresh[len(l.refresh)-1]
}

func (l *issuerLog) tokens() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append(append([]string(nil), l.access...), l.refresh...)
}

// resourceServer is a small API protected by tokenpipe: it introspects every
// bearer token and answers 401 to an inactive one. /hello answers the token's
// subject; /echo answers the request body.
type resourceServer struct {
	srv       *httptest.Server
	issuerURL string
	api       string // the resource server's client secret
	// gate, if set, is called before each request is answered.
	gate func(r *http.Request)

	mu        sync.Mutex
	presented []string // bearer token of each request, in arrival order
}

func newResourceServer(t *testing.T, issuerURL, api string) *resourceServer {
	rs := &resourceServer{issuerURL: issuerURL, api: api}
	rs.srv = httptest.NewServer(http.HandlerFunc(rs.serve))
	t.Cleanup(rs.srv.Close)
	return rs
}

func (rs *resourceServer) serve(w http.ResponseWriter, r *http.Request) {
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	rs.mu.Lock()
	rs.presented = append(rs.presented, token)
	rs.mu.Unlock()
	if rs.gate != nil {
		rs.gate(r)
	}
	ans, err := rs.introspect(r.Context(), token)
	switch {
	case err != nil:
		http.Error(w, err.Error(), http.StatusBadGateway)
	case !ok || !ans.Active:
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		http.Error(w, "invalid token", http.StatusUnauthorized)
	case r.URL.Path == "/echo":
		_, _ = io.Copy(w, r.Body)
	default:
		_, _ = io.WriteString(w, "hello "+ans.Sub)
	}
}

type introspection struct {
	Active bool   `json:"active"`
	Sub    string `json:"sub"`
}

// introspect asks the issuer about token (RFC 7662) as client "api".
func (rs *resourceServer) introspect(ctx context.Context, token string) (introspection, error) {
	var ans introspection
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rs.issuerURL+"/oauth2/introspect",
		strings.NewReader(url.Values{"token": {token}}.Encode()))
	if err != nil {
		return ans, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("api", rs.api)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ans, err
	}
	defer resp.Body.Close()
	return ans, json.NewDecoder(resp.Body).Decode(&ans)
}

// presentedTokens returns the bearer tokens the resource server received.
func (rs *resourceServer) presentedTokens() []string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]string(nil), rs.presented...)
}

// waitInactive waits until the issuer says token is no longer active.
func (w *world) waitInactive(t *testing.T, token string) {
	t.Helper()
	testenv.Eventually(t, 60*time.Second, "the token to become inactive", func() (bool, error) {
		ans, err := w.resource.introspect(context.Background(), token)
		return !ans.Active, err
	})
}

// revoke revokes token at the issuer (RFC 7009) as client "app".
func (w *world) revoke(t *testing.T, token, hint string) {
	t.Helper()
	form := url.Values{"token": {token}, "token_type_hint": {hint}}
	req, err := http.NewRequest(http.MethodPost, w.issuer.URL+"/oauth2/revoke", strings.NewReader(form.Encode()))
	testenv.Must(t, err, "revoke request")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("app", w.secret)
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "revoke")
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke answered %d", resp.StatusCode)
	}
}

// lockedBuffer collects log output from concurrent goroutines.
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
