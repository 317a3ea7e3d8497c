package resource_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
	"github.com/tokenpipe/tokenpipe/resource"
)

// world is a real pipeline (persister and recovery running), two issuer
// instances on it, and a resource server behind each, through the
// middleware; client "app" rotates.
type world struct {
	p       *pipetest.Pipeline
	issuers []string // base URLs
	apis    []string // resource servers, apis[i] talks to issuers[i]
	secret  string
	served  atomic.Int64 // API requests the middleware has finished
}

func newWorld(t *testing.T, window time.Duration, handler http.Handler) *world {
	t.Helper()
	p := pipetest.New(t)
	p.Start(t, 1)
	ctx := context.Background()
	w := &world{p: p}
	var err error
	w.secret, err = clients.Add(ctx, p.Pool, "app", []string{"read"}, []string{"password", tokens.GrantTokenExchange})
	testenv.Must(t, err, "add client")
	apiSecret, err := clients.AddWith(ctx, p.Pool, "api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	testenv.Must(t, clients.AddUser(ctx, p.Pool, "alice", "password1", 4), "add user")
	cfg := issuer.Config{Topology: p.Topo, Keys: testenv.Keys(), CoalesceWindow: -1, RotationWindow: window, Instance: "test"}
	for range 2 {
		js, err := issuer.NewJetStream(p.JS.Conn(), cfg)
		testenv.Must(t, err, "jetstream")
		iss := issuer.New(cfg, clients.NewRegistry(p.Pool, time.Minute), p.JS.Conn(), js, p.Pool,
			testenv.Logger(t), issuer.NewMetrics(prometheus.NewRegistry()))
		stop, err := iss.WatchNotices()
		testenv.Must(t, err, "watch notices")
		t.Cleanup(stop)
		srv := httptest.NewServer(iss.Handler())
		t.Cleanup(srv.Close)
		w.issuers = append(w.issuers, srv.URL)
		mw := &resource.Middleware{
			Validator: &resource.Introspector{URL: srv.URL + "/oauth2/introspect", ClientID: "api", ClientSecret: apiSecret},
			Exchanger: &resource.Exchanger{TokenURL: srv.URL + "/oauth2/token", Clients: map[string]string{"app": w.secret}},
			Log:       slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		wrapped := mw.Wrap(handler)
		api := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			defer w.served.Add(1)
			wrapped.ServeHTTP(rw, r)
		}))
		t.Cleanup(api.Close)
		w.apis = append(w.apis, api.URL)
	}
	return w
}

// whoami answers the validated token's user.
var whoami = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	tok, _ := resource.FromContext(r.Context())
	_, _ = io.WriteString(w, tok.Username)
})

func (w *world) signIn(t *testing.T) string {
	t.Helper()
	form := url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"password1"}, "scope": {"read"}}
	req, _ := http.NewRequest(http.MethodPost, w.issuers[0]+"/oauth2/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("app", w.secret)
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(t, err, "sign in")
	defer resp.Body.Close()
	var ans struct {
		AccessToken string `json:"access_token"`
	}
	testenv.Must(t, json.NewDecoder(resp.Body).Decode(&ans), "decode")
	if ans.AccessToken == "" {
		t.Fatalf("sign-in = %d", resp.StatusCode)
	}
	return ans.AccessToken
}

type call struct {
	status int
	next   string
	body   string
}

func callAPI(ctx context.Context, base, token string) (call, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/thing", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return call{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	c := call{status: resp.StatusCode, next: resp.Header.Get(resource.HeaderNextToken), body: string(b)}
	if c.next != "" && (resp.Header.Get(resource.HeaderNextTokenExpiresIn) == "" || resp.Header.Get("Cache-Control") != "no-store") {
		return c, errMissingHeaders
	}
	return c, nil
}

var errMissingHeaders = &headerError{}

type headerError struct{}

func (*headerError) Error() string {
	return "a successor without its Expires-In header or without Cache-Control: no-store"
}

// TestParallelBatchesShareOneSuccessor: a client sends rounds of parallel
// requests, spread over two resource servers and two issuers, each round
// with the newest token it has seen. No request is refused, every answer
// that carries a successor in one round carries the same one, and the
// client never receives a token older than one it already has.
func TestParallelBatchesShareOneSuccessor(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 5*time.Second, whoami)
	token := w.signIn(t)
	seen := map[string]int{token: 0} // token -> round it was first received in
	for round := 1; round <= 5; round++ {
		calls := make([]call, 10)
		var wg sync.WaitGroup
		for i := range calls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := callAPI(context.Background(), w.apis[i%2], token)
				if err != nil {
					t.Error(err)
				}
				calls[i] = c
			}()
		}
		wg.Wait()
		next := ""
		for i, c := range calls {
			if c.status != 200 || c.body != "alice" {
				t.Fatalf("round %d request %d = %d %q; want 200 alice", round, i, c.status, c.body)
			}
			if c.next == "" {
				continue
			}
			if next != "" && c.next != next {
				t.Fatalf("round %d: two successors for one token", round)
			}
			if r, ok := seen[c.next]; ok {
				t.Fatalf("round %d handed out the token first received in round %d", round, r)
			}
			next = c.next
		}
		if next == "" {
			t.Fatalf("round %d: no request carried a successor", round)
		}
		seen[next] = round
		token = next
	}
}

// TestOlderSuccessorNeverHandedOut: A was exchanged for B, and B for C. A
// request still presenting A (inside its window) is served, and carries no
// header: the client holds B or C already.
func TestOlderSuccessorNeverHandedOut(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 5*time.Second, whoami)
	a := w.signIn(t)
	first, err := callAPI(context.Background(), w.apis[0], a)
	testenv.Must(t, err, "call with A")
	if first.next == "" {
		t.Fatal("no successor for A")
	}
	second, err := callAPI(context.Background(), w.apis[1], first.next)
	testenv.Must(t, err, "call with B")
	if second.next == "" {
		t.Fatal("no successor for B")
	}
	late, err := callAPI(context.Background(), w.apis[0], a)
	testenv.Must(t, err, "late call with A")
	if late.status != 200 || late.next != "" {
		t.Fatalf("late request with A = %d, next token set: %v; want 200 without a successor", late.status, late.next != "")
	}
}

// TestCancelledRequestKeepsToken: a request the client cancels before the
// answer does not exchange its token, and a successor whose answer was lost
// is handed out again inside the window.
func TestCancelledRequestKeepsToken(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	slow := http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("slow") != "" {
			entered <- struct{}{}
			<-r.Context().Done() // the client went away
			<-release
		}
		whoami(rw, r)
	})
	w := newWorld(t, 5*time.Second, slow)
	a := w.signIn(t)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, w.apis[0]+"/thing?slow=1", nil)
		req.Header.Set("Authorization", "Bearer "+a)
		_, err := http.DefaultClient.Do(req)
		done <- err
	}()
	<-entered
	cancel()
	<-done
	close(release)
	testenv.Eventually(t, 10*time.Second, "cancelled request finished", func() (bool, error) {
		return w.served.Load() == 1, nil
	})
	if n := w.p.Count(t, `SELECT count(*) FROM token_exchanges`); n != 0 {
		t.Fatalf("a cancelled request exchanged the client's token (%d exchanges recorded)", n)
	}

	// An answer lost after the exchange: the successor comes again.
	c1, err := callAPI(context.Background(), w.apis[0], a)
	testenv.Must(t, err, "call")
	c2, err := callAPI(context.Background(), w.apis[1], a)
	testenv.Must(t, err, "repeat call")
	if c1.next == "" || c2.next != c1.next {
		t.Fatalf("a client that lost its successor did not get the same one again inside the window")
	}
}

// TestWindowEndsAndBadCredentials: the presented token is refused once its
// window has passed (and the cache cannot stretch that past its TTL); no
// token, a malformed header and garbage are 401.
func TestWindowEndsAndBadCredentials(t *testing.T) {
	t.Parallel()
	w := newWorld(t, time.Second, whoami)
	a := w.signIn(t)
	c, err := callAPI(context.Background(), w.apis[0], a)
	testenv.Must(t, err, "call")
	if c.status != 200 || c.next == "" {
		t.Fatalf("first call = %d, successor %v", c.status, c.next != "")
	}
	time.Sleep(2500 * time.Millisecond) // the window, then the cache TTL
	for i, api := range w.apis {
		if late, _ := callAPI(context.Background(), api, a); late.status != 401 {
			t.Fatalf("resource server %d: token past its window = %d, want 401", i, late.status)
		}
	}
	if ok, _ := callAPI(context.Background(), w.apis[1], c.next); ok.status != 200 {
		t.Fatalf("successor = %d, want 200", ok.status)
	}
	for name, auth := range map[string]string{"none": "", "basic": "Basic YXBwOng=", "garbage": "Bearer garbage", "two words": "Bearer a b"} {
		req, _ := http.NewRequest(http.MethodGet, w.apis[0]+"/thing", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, name)
		resp.Body.Close()
		if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" || resp.Header.Get(resource.HeaderNextToken) != "" {
			t.Errorf("%s: %d, WWW-Authenticate %q", name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	}
}

// TestClientPackageFollowsRotation: package client's Transport, signed in
// by the password grant, sends rounds of parallel requests through both
// resource servers; it follows Tokenpipe-Next-Token on its own. No request
// is refused, the token the client holds moves on, and the client never
// needs a token request after its sign-in.
func TestClientPackageFollowsRotation(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 5*time.Second, whoami)
	tr := client.New(client.Config{
		OAuth2: oauth2.Config{ClientID: "app", ClientSecret: w.secret, Scopes: []string{"read"},
			Endpoint: oauth2.Endpoint{TokenURL: w.issuers[0] + "/oauth2/token", AuthStyle: oauth2.AuthStyleInHeader}},
		Grant: client.Password("alice", "password1"),
	})
	defer tr.Close()
	hc := tr.Client()
	before := w.p.Count(t, `SELECT count(*) FROM token_exchanges`)
	for round := range 5 {
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := hc.Get(w.apis[i%2] + "/thing")
				if err != nil {
					t.Error(err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != "alice" {
					t.Errorf("round %d request %d = %d %q", round, i, resp.StatusCode, b)
				}
				if resp.Header.Get(resource.HeaderNextToken) != "" {
					t.Error("the client left the successor in the response headers")
				}
			}()
		}
		wg.Wait()
	}
	if t.Failed() {
		t.FailNow()
	}
	if n := w.p.Count(t, `SELECT count(*) FROM token_exchanges`) - before; n < 2 {
		t.Fatalf("%d tokens exchanged over 5 rounds; the client did not follow the rotation", n)
	}
	if n := w.p.Count(t, `SELECT count(*) FROM tokens WHERE grant_type = 'password'`); n > 1 {
		t.Fatalf("%d sign-ins: the client asked for a token instead of following the rotation", n)
	}
}
