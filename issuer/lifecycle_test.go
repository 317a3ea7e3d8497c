package issuer_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
	"github.com/tokenpipe/tokenpipe/persister"
)

const adminToken = "test-admin-token-0123456789"

// lifecycleEnv is an async issuer with the lifecycle settings under test;
// the persister and recovery run only when a test starts them.
func lifecycleEnv(t *testing.T, tune func(*issuer.Config)) (*env, *pipetest.Pipeline) {
	t.Helper()
	p := pipetest.New(t)
	cfg := config(p.Topo, issuer.ModeAsync)
	cfg.AdminToken = adminToken
	if tune != nil {
		tune(&cfg)
	}
	nc := p.JS.Conn()
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	e := startEnv(t, p.Pool, nc, js, p.Topo, cfg)
	stop, err := e.iss.WatchNotices()
	testenv.Must(t, err, "watch notices")
	t.Cleanup(stop)
	return e, p
}

// second starts another issuer instance on the same database and stream,
// sharing nothing with the first but the configuration (and so the key).
func (e *env) second(t *testing.T, cfg issuer.Config) *httptest.Server {
	t.Helper()
	_, srv := e.secondIssuer(t, cfg)
	return srv
}

func (e *env) secondIssuer(t *testing.T, cfg issuer.Config) (*issuer.Server, *httptest.Server) {
	t.Helper()
	js, err := issuer.NewJetStream(e.js.Conn(), cfg)
	testenv.Must(t, err, "jetstream")
	iss := issuer.New(cfg, clients.NewRegistry(e.pool, time.Minute), e.js.Conn(), js, e.pool,
		slog.New(slog.NewTextHandler(e.logs, nil)), issuer.NewMetrics(prometheus.NewRegistry()))
	srv := httptest.NewServer(iss.Handler())
	t.Cleanup(srv.Close)
	return iss, srv
}

func (e *env) to(t *testing.T, base, path string, form url.Values, mutate ...func(*http.Request)) answer {
	t.Helper()
	r, _ := http.NewRequest(http.MethodPost, base+path, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for _, m := range mutate {
		m(r)
	}
	return do(t, r)
}

// concurrently sends n copies of a token request at once, spread over the
// given issuer base URLs in turn, as client "app".
func (e *env) concurrently(t *testing.T, n int, bases []string, form url.Values) []answer {
	t.Helper()
	answers := make([]answer, n)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, _ := http.NewRequest(http.MethodPost, bases[i%len(bases)]+"/oauth2/token", strings.NewReader(form.Encode()))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			basic("app", e.secret)(r)
			a, err := send(r)
			if err != nil {
				t.Error(err)
			}
			answers[i] = a
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return answers
}

func (e *env) password(t *testing.T, base string) answer {
	t.Helper()
	a := e.to(t, base, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}, "scope": {"read"}}, basic("app", e.secret))
	if a.status != 200 || a.body["refresh_token"] == nil {
		t.Fatalf("password grant = %d %v", a.status, a.body)
	}
	return a
}

func (e *env) refreshWith(t *testing.T, base, refresh string) answer {
	t.Helper()
	return e.to(t, base, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, basic("app", e.secret))
}

func (e *env) introspect(t *testing.T, token string) answer {
	t.Helper()
	a := e.to(t, e.srv.URL, "/oauth2/introspect", url.Values{"token": {token}}, basic("api", e.api))
	if a.status != 200 {
		t.Fatalf("introspect = %d %v", a.status, a.body)
	}
	return a
}

func (e *env) revokeToken(t *testing.T, token string) {
	t.Helper()
	if a := e.to(t, e.srv.URL, "/oauth2/revoke", url.Values{"token": {token}}, basic("app", e.secret)); a.status != 200 {
		t.Fatalf("revoke = %d %v", a.status, a.body)
	}
}

func (e *env) state(t *testing.T, token string) string {
	t.Helper()
	var s string
	d := events.DigestOf(token)
	err := e.pool.QueryRow(context.Background(), `SELECT state FROM tokens WHERE token_digest = $1`, d[:]).Scan(&s)
	if err != nil {
		return "none"
	}
	return s
}

// storedRows reads the test stream's TokenIssued events as persister rows.
func (e *env) storedRows(t *testing.T) []persister.Row {
	t.Helper()
	var rows []persister.Row
	for _, m := range e.streamMessages(t) {
		if m.Subject != e.topo.IssuedSubject() {
			continue
		}
		ev, err := events.DecodeTokenIssued(m.Data)
		testenv.Must(t, err, "decode")
		rows = append(rows, persister.Row{Event: ev, Seq: m.Sequence})
	}
	return rows
}

// TestConcurrentRefreshesShareOnePair: ten redemptions of one refresh token,
// spread over two issuer instances inside the grace window, all succeed with
// the same new pair, and JetStream holds one event for it. A redemption
// after the window is reuse: refused, and the whole family is revoked,
// including the pair just handed out.
func TestConcurrentRefreshesShareOnePair(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.RefreshGrace = 2 * time.Second; cfg = *c })
	other := e.second(t, cfg)
	first := e.password(t, e.srv.URL)
	refresh := first.body["refresh_token"].(string)

	answers := e.concurrently(t, 10, []string{e.srv.URL, other.URL}, url.Values{
		"grant_type": {"refresh_token"}, "refresh_token": {refresh}})
	for i, a := range answers {
		if a.status != 200 {
			t.Fatalf("refresh %d = %d %v", i, a.status, a.body)
		}
		if a.body["access_token"] != answers[0].body["access_token"] || a.body["refresh_token"] != answers[0].body["refresh_token"] {
			t.Fatalf("refresh %d got a different pair than refresh 0", i)
		}
	}
	newAccess, newRefresh := answers[0].token(t), answers[0].body["refresh_token"].(string)
	if newAccess == first.token(t) || newRefresh == refresh {
		t.Fatal("refresh did not rotate the tokens")
	}
	if n := len(e.storedRows(t)); n != 2 {
		t.Fatalf("stream holds %d token events, want 2 (the grant and one rotation)", n)
	}
	p.Start(t, 2)
	p.Drained(t)
	if s := e.state(t, newAccess); s != "ACTIVE" {
		t.Fatalf("rotated access token is %s, want ACTIVE", s)
	}
	// The new refresh token works (and its own rotation is fine).
	if a := e.introspectAs(t, "app", e.secret, newRefresh); a.body["active"] != true {
		t.Fatalf("new refresh token introspects as %v", a.body)
	}

	time.Sleep(2500 * time.Millisecond) // past the grace window of the first redemption
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("reuse after the window = %d %v, want 400 invalid_grant", a.status, a.body)
	}
	if a := e.introspect(t, newAccess); a.body["active"] != false {
		t.Fatalf("after reuse the rotated access token still introspects as %v", a.body)
	}
	if a := e.refreshWith(t, e.srv.URL, newRefresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("after reuse the rotated refresh token still works: %d %v", a.status, a.body)
	}
	for _, tok := range []string{first.token(t), newAccess} {
		if s := e.state(t, tok); s != "REVOKED" {
			t.Fatalf("a family member is %s after reuse, want REVOKED", s)
		}
	}
	if n := e.metric(t, "tokenpipe_issuer_refresh_reuse_total"); n != 1 {
		t.Fatalf("refresh_reuse_total = %v, want 1", n)
	}
}

// TestRefreshDisabledPerClient: a client without the refresh_token grant
// gets no refresh token and cannot redeem one.
func TestRefreshDisabledPerClient(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	ctx := context.Background()
	secret, err := clients.Add(ctx, e.pool, "norefresh", []string{"read"}, []string{"password"})
	testenv.Must(t, err, "add client")
	a := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}}, basic("norefresh", secret))
	if a.status != 200 || a.body["refresh_token"] != nil {
		t.Fatalf("password grant for a client without refresh = %d %v", a.status, a.body)
	}
	refresh := e.password(t, e.srv.URL).body["refresh_token"].(string)
	a = e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, basic("norefresh", secret))
	if a.status != 400 || a.body["error"] != "unauthorized_client" {
		t.Fatalf("refresh by a client without the grant = %d %v", a.status, a.body)
	}
	// Another client's refresh token is not this client's to redeem.
	if a := e.refreshWith(t, e.srv.URL, "not-a-token"); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("garbage refresh token = %d %v", a.status, a.body)
	}
}

// TestRevokeBeforePersistNeverActive: a token revoked while its event is
// queued ends REVOKED whichever write lands first, and a replay of its
// event does not bring it back. Covers RFC 7009 access and refresh
// (family) revocation and a user's grant revocation.
func TestRevokeBeforePersistNeverActive(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	cases := map[string]func(t *testing.T, e *env, a answer){
		"access token": func(t *testing.T, e *env, a answer) { e.revokeToken(t, a.token(t)) },
		"refresh token (family)": func(t *testing.T, e *env, a answer) {
			e.revokeToken(t, a.body["refresh_token"].(string))
		},
		"user removes the application": func(t *testing.T, e *env, a answer) {
			r, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/account/applications/app", nil)
			r.SetBasicAuth("alice", userPassword)
			if got := do(t, r); got.status != 200 {
				t.Fatalf("remove application = %d %v", got.status, got.body)
			}
		},
	}
	for name, revokeIt := range cases {
		for _, order := range []string{"revoke first", "persist first"} {
			t.Run(name+"/"+order, func(t *testing.T) {
				t.Parallel()
				e, _ := lifecycleEnv(t, nil)
				a := e.password(t, e.srv.URL)
				rows := e.storedRows(t)
				if order == "persist first" {
					if _, err := persister.WriteBatch(ctx, e.pool, rows); err != nil {
						t.Fatal(err)
					}
					if s := e.state(t, a.token(t)); s != "ACTIVE" {
						t.Fatalf("persisted token is %s", s)
					}
				}
				revokeIt(t, e, a)
				if intro := e.introspect(t, a.token(t)); intro.body["active"] != false {
					t.Fatalf("revoked token introspects as %v", intro.body)
				}
				// The queued event lands (or, persist first, is redelivered),
				// then a replay writes it again.
				for range 2 {
					if _, err := persister.WriteBatch(ctx, e.pool, rows); err != nil {
						t.Fatal(err)
					}
					if s := e.state(t, a.token(t)); s != "REVOKED" {
						t.Fatalf("token is %s, want REVOKED", s)
					}
				}
				if intro := e.introspect(t, a.token(t)); intro.body["active"] != false {
					t.Fatalf("revoked token introspects as %v after persisting", intro.body)
				}
				// A new authorization after the revocation is not affected.
				fresh := e.password(t, e.srv.URL)
				all := e.storedRows(t)
				if _, err := persister.WriteBatch(ctx, e.pool, all[len(all)-1:]); err != nil {
					t.Fatal(err)
				}
				if s := e.state(t, fresh.token(t)); s != "ACTIVE" {
					t.Fatalf("a token issued after the revocation is %s, want ACTIVE", s)
				}
			})
		}
	}
}

// TestIntrospection: a token just issued, whose row is not written because
// no persister runs, introspects as active; once recovery deactivates it in
// favour of a newer token of its key, it introspects inactive, although its
// positive answer was cached for much longer; expired and foreign tokens are
// inactive.
func TestIntrospection(t *testing.T) {
	t.Parallel()
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.IntrospectCacheTTL = time.Hour })
	first := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret)).token(t)
	a := e.introspect(t, first)
	want := map[string]any{"active": true, "client_id": "app", "sub": "app", "scope": "read", "token_type": "Bearer"}
	for k, v := range want {
		if a.body[k] != v {
			t.Fatalf("introspection of a queued token: %s = %v, want %v (%v)", k, a.body[k], v, a.body)
		}
	}
	if exp, iat := a.body["exp"].(float64), a.body["iat"].(float64); exp-iat != 3600 {
		t.Fatalf("exp - iat = %v, want 3600", exp-iat)
	}
	if e.state(t, first) != "none" {
		t.Fatal("the row exists; the test needs it queued")
	}

	p.Start(t, 1)
	p.Drained(t)
	if a := e.introspect(t, first); a.body["active"] != true { // now from the row, and cached
		t.Fatalf("persisted token introspects as %v", a.body)
	}
	e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret))
	p.Drained(t)
	if s := e.state(t, first); s != "INACTIVE" {
		t.Fatalf("first token is %s after a newer one, want INACTIVE", s)
	}
	testenv.Eventually(t, 10*time.Second, "deactivation notice reaches the cache", func() (bool, error) {
		return e.introspect(t, first).body["active"] == false, nil
	})

	for name, tok := range map[string]string{"garbage": "abc", "empty-ish": strings.Repeat("A", 200)} {
		if a := e.introspect(t, tok); len(a.body) != 1 || a.body["active"] != false {
			t.Fatalf("%s token introspects as %v, want only active=false", name, a.body)
		}
	}
	if a := e.to(t, e.srv.URL, "/oauth2/introspect", url.Values{"token": {first}}); a.status != 401 {
		t.Fatalf("unauthenticated introspection = %d", a.status)
	}
}

// TestCoalescedRequestsShareOneToken: identical requests through two
// instances in one window get one token and one event; once that token is
// revoked, the next identical request gets a new one.
func TestCoalescedRequestsShareOneToken(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = 10 * time.Minute; cfg = *c })
	other := e.second(t, cfg)
	tokensSeen := map[string]int{}
	for _, a := range e.concurrently(t, 8, []string{e.srv.URL, other.URL}, url.Values{
		"grant_type": {"client_credentials"}, "scope": {"read"}}) {
		if a.status != 200 {
			t.Fatalf("request = %d %v", a.status, a.body)
		}
		tokensSeen[a.token(t)]++
	}
	// A window boundary inside the burst would split it in two; with a
	// ten-minute window that is one chance in thousands.
	if len(tokensSeen) != 1 {
		t.Fatalf("8 identical requests got %d tokens, want 1", len(tokensSeen))
	}
	if n := len(e.storedRows(t)); n != 1 {
		t.Fatalf("stream holds %d events, want 1", n)
	}
	var shared string
	for tok := range tokensSeen {
		shared = tok
	}
	e.revokeToken(t, shared)
	again := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret))
	if again.status != 200 || again.token(t) == shared {
		t.Fatalf("after revocation the same request got %d, same token: %v", again.status, again.token(t) == shared)
	}
	if a := e.introspect(t, again.token(t)); a.body["active"] != true {
		t.Fatalf("the fresh token introspects as %v", a.body)
	}
}

// TestManagementAPI: a user lists the applications holding live tokens and
// removes one; an admin lists a client's tokens. No answer holds plaintext.
func TestManagementAPI(t *testing.T) {
	t.Parallel()
	e, p := lifecycleEnv(t, nil)
	a := e.password(t, e.srv.URL)
	p.Start(t, 1)
	p.Drained(t)
	get := func(path string, auth func(*http.Request)) answer {
		r, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
		auth(r)
		return do(t, r)
	}
	user := func(r *http.Request) { r.SetBasicAuth("alice", userPassword) }
	admin := func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+adminToken) }
	apps := get("/account/applications", user)
	list, _ := apps.body["applications"].([]any)
	if apps.status != 200 || len(list) != 1 || list[0].(map[string]any)["client_id"] != "app" {
		t.Fatalf("applications = %d %v", apps.status, apps.body)
	}
	if got := get("/account/applications", func(r *http.Request) { r.SetBasicAuth("alice", "wrong") }); got.status != 401 {
		t.Fatalf("wrong password = %d", got.status)
	}
	toks := get("/admin/clients/app/tokens?state=active", admin)
	if l, _ := toks.body["tokens"].([]any); toks.status != 200 || len(l) != 1 {
		t.Fatalf("client tokens = %d %v", toks.status, toks.body)
	}
	if got := get("/admin/clients/app/tokens", func(r *http.Request) { r.Header.Set("Authorization", "Bearer nope") }); got.status != 401 {
		t.Fatalf("bad admin token = %d", got.status)
	}
	for _, body := range []map[string]any{apps.body, toks.body} {
		for _, secret := range []string{a.token(t), a.body["refresh_token"].(string)} {
			if strings.Contains(fmtAny(body), secret) {
				t.Fatal("the management API showed token plaintext")
			}
		}
	}
	r, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/admin/users/alice/applications/app", nil)
	admin(r)
	if got := do(t, r); got.status != 200 || got.body["revoked_tokens"] != float64(1) {
		t.Fatalf("admin revoke = %d %v", got.status, got.body)
	}
	if l, _ := get("/account/applications", user).body["applications"].([]any); len(l) != 0 {
		t.Fatalf("applications after removal = %v", l)
	}
	if got := e.refreshWith(t, e.srv.URL, a.body["refresh_token"].(string)); got.status != 400 {
		t.Fatalf("refresh after the application was removed = %d %v", got.status, got.body)
	}
}

func fmtAny(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// TestUnconfirmedTokenDoesNotDeactivateTheHeldOne: a publish whose ack does
// not come in time answers 503, but JetStream may store the event anyway.
// That token, which nobody holds, must not supersede the key's token the
// client does hold.
func TestUnconfirmedTokenDoesNotDeactivateTheHeldOne(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var cfg issuer.Config
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { cfg = *c })
	held := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret)).token(t)
	if _, err := persister.WriteBatch(ctx, e.pool, e.storedRows(t)); err != nil {
		t.Fatal(err)
	}
	cfg.PublishTimeout = time.Nanosecond // every ack comes too late
	impatient := e.second(t, cfg)
	unavailable := 0
	handed := map[events.Digest]bool{}
	for range 20 {
		a := e.to(t, impatient.URL, "/oauth2/token", url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("app", e.secret))
		switch a.status {
		case 503:
			unavailable++
		case 200: // the ack beat the timer: a real token, allowed to supersede
			handed[events.DigestOf(a.token(t))] = true
		}
	}
	testenv.Eventually(t, 10*time.Second, "the unconfirmed events reach the stream", func() (bool, error) {
		return len(e.storedRows(t)) > 1+len(handed), nil
	})
	rows := e.storedRows(t)[1:]
	if unavailable == 0 {
		t.Fatal("the test needs 503s whose events were stored")
	}
	outcomes, err := persister.WriteBatch(ctx, e.pool, rows)
	if err != nil {
		t.Fatal(err)
	}
	for i, o := range outcomes {
		if d := rows[i].Event.TokenDigest; !handed[d] && o != persister.Existing {
			t.Fatalf("unconfirmed token %d: outcome %v, want Existing (already recorded REVOKED)", i, o)
		}
	}
	if s := e.state(t, held); len(handed) == 0 && s != "ACTIVE" {
		t.Fatalf("the token the client holds is %s after unconfirmed tokens for its key", s)
	}
}

// TestExpiredTokensAreInactiveAtOnce: expiry is read from the token itself,
// whatever its row says, for access and refresh tokens alike.
func TestExpiredTokensAreInactiveAtOnce(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	past := time.Now().Add(-2 * time.Hour)
	for _, kind := range []tokens.Kind{tokens.Access, tokens.Refresh} {
		text, err := testenv.Keys().Encode(tokens.Claims{Kind: kind, Grant: "password", ClientID: "app", Subject: "alice",
			Scope: "read", IssuedAt: past, ExpiresAt: past.Add(time.Hour)})
		testenv.Must(t, err, "encode")
		if a := e.introspect(t, text); len(a.body) != 1 || a.body["active"] != false {
			t.Fatalf("expired %s introspects as %v", kind, a.body)
		}
		if kind == tokens.Refresh {
			if a := e.refreshWith(t, e.srv.URL, text); a.status != 400 || a.body["error"] != "invalid_grant" {
				t.Fatalf("expired refresh token redeemed: %d %v", a.status, a.body)
			}
		}
	}
	// The same claims, unexpired, are active: the test above is about expiry.
	text, _ := testenv.Keys().Encode(tokens.Claims{Kind: tokens.Access, Grant: "password", ClientID: "app", Subject: "alice",
		Scope: "read", IssuedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	if a := e.introspect(t, text); a.body["active"] != true {
		t.Fatalf("unexpired token introspects as %v", a.body)
	}
}

// TestLifecycleInSyncMode: the same promises when rows are written inside
// the request: concurrent refreshes share one pair (one row), revocation
// and introspection agree, and a refresh after revocation is refused.
func TestLifecycleInSyncMode(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeSync)
	pair := e.password(t, e.srv.URL)
	answers := e.concurrently(t, 10, []string{e.srv.URL}, url.Values{
		"grant_type": {"refresh_token"}, "refresh_token": {pair.body["refresh_token"].(string)}})
	for i, a := range answers {
		if a.status != 200 || a.body["access_token"] != answers[0].body["access_token"] {
			t.Fatalf("sync refresh %d = %d %v, or another pair than refresh 0", i, a.status, a.body)
		}
	}
	access, refresh := answers[0].token(t), answers[0].body["refresh_token"].(string)
	if s := e.state(t, access); s != "ACTIVE" {
		t.Fatalf("rotated token is %s", s)
	}
	if s := e.state(t, pair.token(t)); s != "INACTIVE" {
		t.Fatalf("the pair it replaced is %s, want INACTIVE (same key)", s)
	}
	if a := e.introspect(t, access); a.body["active"] != true {
		t.Fatalf("introspect = %v", a.body)
	}
	e.revokeToken(t, refresh)
	if a := e.introspect(t, access); a.body["active"] != false {
		t.Fatalf("after revoking its refresh token the access token introspects as %v", a.body)
	}
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("refresh after revocation = %d %v", a.status, a.body)
	}
}
