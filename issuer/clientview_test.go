package issuer_test

import (
	"context"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// These tests hold the promise a client sees: a token handed out stays good
// until its key gets a newer answer, it is revoked, or it expires; identical
// requests do not churn tokens that deactivate one another; one refresh
// token has one successor.

var ccRead = url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}

// fakeClock is a settable clock for coalescing windows.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Set(t time.Time) { c.mu.Lock(); defer c.mu.Unlock(); c.now = t }

// withClock installs a fake clock in the middle of the current minute-long
// window, so the test owns every window edge.
func withClock(e *env) (*fakeClock, time.Time) {
	start := time.Now().Truncate(time.Minute).Add(30 * time.Second)
	c := &fakeClock{now: start}
	issuer.SetClock(e.iss, c.Now)
	return c, start
}

// TestStaleWindowSharesTheNewerToken replays the window edge that started
// the churn: window W's token is persisted and has deactivated window W-1's,
// then a request that computed W-1 (it was slow) finds W-1's token INACTIVE.
// It must hand out W's token, not mint a fresh one that supersedes it.
func TestStaleWindowSharesTheNewerToken(t *testing.T) {
	t.Parallel()
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = time.Minute })
	clock, start := withClock(e)
	older := e.post(t, ccRead, basic("app", e.secret)).token(t)
	clock.Set(start.Add(time.Minute))
	newer := e.post(t, ccRead, basic("app", e.secret)).token(t)
	p.Start(t, 1)
	p.Drained(t)
	if s := e.state(t, older); s != "INACTIVE" {
		t.Fatalf("window W-1's token is %s, want INACTIVE", s)
	}

	clock.Set(start) // a request that cut its window before the edge
	stale := e.post(t, ccRead, basic("app", e.secret))
	if stale.status != 200 {
		t.Fatalf("stale request = %d %v", stale.status, stale.body)
	}
	if got := stale.token(t); got != newer {
		t.Fatalf("the stale request got another token than window W's (older: %v)", got == older)
	}
	p.Drained(t)
	if n := len(e.storedRows(t)); n != 2 {
		t.Fatalf("stream holds %d events, want 2 (one per window)", n)
	}
	if s := e.state(t, newer); s != "ACTIVE" {
		t.Fatalf("window W's token is %s after the stale request, want ACTIVE", s)
	}
}

// TestRevokedCoalescedTokenIsReplacedOnce: after the window's token is
// revoked, identical requests in the same window, sequential and
// concurrent, over two instances, all get one new token, not one each.
func TestRevokedCoalescedTokenIsReplacedOnce(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = time.Minute; cfg = *c })
	clock, _ := withClock(e)
	second, other := e.secondIssuer(t, cfg)
	issuer.SetClock(second, clock.Now)
	first := e.post(t, ccRead, basic("app", e.secret)).token(t)
	e.revokeToken(t, first)

	got := map[string]int{}
	for range 3 {
		got[e.post(t, ccRead, basic("app", e.secret)).token(t)]++
	}
	for _, a := range e.concurrently(t, 8, []string{e.srv.URL, other.URL}, ccRead) {
		if a.status != 200 {
			t.Fatalf("request = %d %v", a.status, a.body)
		}
		got[a.token(t)]++
	}
	if len(got) != 1 {
		t.Fatalf("11 identical requests after a revocation got %d tokens, want 1", len(got))
	}
	for tok := range got {
		if tok == first {
			t.Fatal("the revoked token was handed out again")
		}
		p.Start(t, 1)
		p.Drained(t)
		if s := e.state(t, tok); s != "ACTIVE" {
			t.Fatalf("the replacement is %s", s)
		}
	}
	if n := len(e.storedRows(t)); n != 2 {
		t.Fatalf("stream holds %d events, want 2", n)
	}
}

// TestCoalescedRequestAfterAForeignToken: a token that coalescing cannot
// derive again (here from an instance with coalescing off; in production
// also a sync-mode or fallback token) supersedes the window's token; the
// identical requests that follow in the same window get one new token
// between them, before and after it is persisted.
func TestCoalescedRequestAfterAForeignToken(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = time.Minute; cfg = *c })
	withClock(e)
	first := e.post(t, ccRead, basic("app", e.secret)).token(t)
	cfg.CoalesceWindow = -1
	random := e.second(t, cfg)
	foreign := e.to(t, random.URL, "/oauth2/token", ccRead, basic("app", e.secret)).token(t)
	p.Start(t, 1)
	p.Drained(t)
	if s := e.state(t, first); s != "INACTIVE" {
		t.Fatalf("the window's token is %s after a newer one, want INACTIVE", s)
	}
	again := e.post(t, ccRead, basic("app", e.secret)).token(t)
	if again == first || again == foreign {
		t.Fatal("a superseded token or another instance's token was handed out")
	}
	if s := e.post(t, ccRead, basic("app", e.secret)).token(t); s != again {
		t.Fatal("the next identical request got yet another token (queued)")
	}
	p.Drained(t)
	if s := e.post(t, ccRead, basic("app", e.secret)).token(t); s != again {
		t.Fatal("the next identical request got yet another token (persisted)")
	}
	if s := e.state(t, again); s != "ACTIVE" {
		t.Fatalf("the shared token is %s", s)
	}
}

// TestRefreshAfterUnansweredRotationIsNotReuse: a refresh whose new pair
// could not be recorded (the answer was 503) is not a use. The client's
// retry after the grace window gets the pair, and only a redemption after
// that answer's grace window is reuse.
func TestRefreshAfterUnansweredRotationIsNotReuse(t *testing.T) {
	t.Parallel()
	var cfg issuer.Config
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.RefreshGrace = 300 * time.Millisecond; cfg = *c })
	refresh := e.password(t, e.srv.URL).body["refresh_token"].(string)
	cfg.PublishTimeout = time.Nanosecond // every ack comes too late
	impatient := e.second(t, cfg)
	if a := e.refreshWith(t, impatient.URL, refresh); a.status != 503 {
		t.Fatalf("refresh through an issuer whose acks time out = %d %v, want 503", a.status, a.body)
	}
	time.Sleep(600 * time.Millisecond) // past the grace window of the failed attempt
	retry := e.refreshWith(t, e.srv.URL, refresh)
	if retry.status != 200 {
		t.Fatalf("retry after a 503 = %d %v, want 200", retry.status, retry.body)
	}
	if a := e.introspectAs(t, "app", e.secret, retry.body["refresh_token"].(string)); a.body["active"] != true {
		t.Fatalf("the new refresh token introspects as %v", a.body)
	}
	time.Sleep(600 * time.Millisecond)
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("redemption after the answered rotation's grace window = %d %v, want invalid_grant", a.status, a.body)
	}
}

// TestOneSuccessorPerRefreshToken: redemptions of one refresh token within
// the grace window asking for different scopes get one pair; the new
// refresh token keeps the presented one's scope (RFC 6749 section 6), so the
// full scope can be asked for again, and its expiry: rotation does not
// extend a family's lifetime.
func TestOneSuccessorPerRefreshToken(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.RefreshGrace = 2 * time.Second })
	grant := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}, "scope": {"read write"}}, basic("app", e.secret))
	if grant.status != 200 {
		t.Fatalf("password grant = %d %v", grant.status, grant.body)
	}
	rt1 := grant.body["refresh_token"].(string)
	narrow := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt1},
		"scope": {"read"}}, basic("app", e.secret))
	full := e.refreshWith(t, e.srv.URL, rt1)
	if narrow.status != 200 || full.status != 200 {
		t.Fatalf("redemptions = %d %v, %d %v", narrow.status, narrow.body, full.status, full.body)
	}
	if narrow.body["refresh_token"] != full.body["refresh_token"] || narrow.token(t) != full.token(t) {
		t.Fatal("two redemptions of one refresh token in its grace window got different pairs")
	}
	if narrow.body["scope"] != "read" {
		t.Fatalf("narrowed access token scope = %v, want read", narrow.body["scope"])
	}
	rt2 := narrow.body["refresh_token"].(string)
	i1, i2 := e.introspectAs(t, "app", e.secret, rt1), e.introspectAs(t, "app", e.secret, rt2)
	if i2.body["scope"] != "read write" {
		t.Fatalf("the new refresh token's scope = %v, want the presented one's (read write)", i2.body["scope"])
	}
	if i1.body["exp"] != i2.body["exp"] {
		t.Fatalf("rotation moved the refresh expiry from %v to %v", i1.body["exp"], i2.body["exp"])
	}
	if next := e.refreshWith(t, e.srv.URL, rt2); next.status != 200 || next.body["scope"] != "read write" {
		t.Fatalf("redeeming the new refresh token for the full scope = %d %v", next.status, next.body)
	}
	if n := len(e.storedRows(t)); n != 3 {
		t.Fatalf("stream holds %d token events, want 3 (grant, one rotation, the next)", n)
	}
}

// TestRefreshTokensIntrospectOnlyForTheirClient: a refresh token is not an
// access credential: to a resource server it is inactive; to its own client
// it is active with token_type refresh_token.
func TestRefreshTokensIntrospectOnlyForTheirClient(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	a := e.password(t, e.srv.URL)
	rt := a.body["refresh_token"].(string)
	if got := e.introspectAs(t, "api", e.api, rt); len(got.body) != 1 || got.body["active"] != false {
		t.Fatalf("a resource server introspecting a refresh token got %v, want only active=false", got.body)
	}
	own := e.introspectAs(t, "app", e.secret, rt)
	if own.body["active"] != true || own.body["token_type"] != "refresh_token" {
		t.Fatalf("the token's own client introspecting its refresh token got %v", own.body)
	}
	if got := e.introspectAs(t, "api", e.api, a.token(t)); got.body["active"] != true || got.body["token_type"] != "Bearer" {
		t.Fatalf("access token introspects as %v", got.body)
	}
}

// TestRemovedUserCannotRefresh: a removed user's refresh token is refused
// and introspects inactive.
func TestRemovedUserCannotRefresh(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	rt := e.password(t, e.srv.URL).body["refresh_token"].(string)
	testenv.Must(t, clients.RemoveUser(context.Background(), e.pool, "alice"), "remove user")
	if a := e.refreshWith(t, e.srv.URL, rt); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("refresh of a removed user = %d %v, want invalid_grant", a.status, a.body)
	}
	if a := e.introspectAs(t, "app", e.secret, rt); a.body["active"] != false {
		t.Fatalf("a removed user's refresh token introspects as %v", a.body)
	}
}

func (e *env) introspectAs(t *testing.T, client, secret, token string) answer {
	t.Helper()
	a := e.to(t, e.srv.URL, "/oauth2/introspect", url.Values{"token": {token}}, basic(client, secret))
	if a.status != 200 {
		t.Fatalf("introspect = %d %v", a.status, a.body)
	}
	return a
}

var _ = http.MethodPost
var _ = events.DigestOf

// TestIdenticalRequestsConvergeUnderLoad: many connections send identical
// requests for a few keys, three copies at once, over two instances, while
// the persister and recovery run, with a short window so the run crosses
// many window edges. The second instance's clock runs behind, so its
// requests keep cutting the previous window after the first instance's
// token for the new one was persisted: the situation of a request slower
// than the persist-plus-recovery lag, at every edge. Each key gets at most
// two tokens per window (one, plus one at an edge), and no token is handed
// out after its row stopped being ACTIVE.
func TestIdenticalRequestsConvergeUnderLoad(t *testing.T) {
	t.Parallel()
	const window = 250 * time.Millisecond
	var cfg issuer.Config
	e, p := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = window; cfg = *c })
	behind, other := e.secondIssuer(t, cfg)
	issuer.SetClock(behind, func() time.Time { return time.Now().Add(-window / 2) })
	p.Start(t, 2)
	scopes := []string{"read", "write", "admin", "read write"}
	hosts := []string{hostOf(e.srv.URL), hostOf(other.URL)}

	var mu sync.Mutex
	lastSent := map[events.Digest]time.Time{} // the latest request that received each token
	requests := 0
	deadline := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	for c := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				scope := scopes[(c+i)%len(scopes)]
				var copies sync.WaitGroup
				for k := range 3 { // the same request, three times at once
					copies.Add(1)
					go func() {
						defer copies.Done()
						sent := time.Now()
						a, err := send(e.form(url.Values{"grant_type": {"client_credentials"}, "scope": {scope}}.Encode(),
							basic("app", e.secret), func(r *http.Request) { r.URL.Host = hosts[(c+i+k)%2] }))
						if err != nil || a.status != 200 {
							t.Errorf("request = %v %d %v", err, a.status, a.body)
							return
						}
						d := events.DigestOf(a.body["access_token"].(string))
						mu.Lock()
						defer mu.Unlock()
						requests++
						if sent.After(lastSent[d]) {
							lastSent[d] = sent
						}
					}()
				}
				copies.Wait()
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	p.Drained(t)

	var most int
	var where string
	err := e.pool.QueryRow(context.Background(), `
		SELECT count(*), scope || ' @ ' || (extract(epoch FROM issued_at) * 1000)::bigint / $1
		FROM tokens GROUP BY scope, (extract(epoch FROM issued_at) * 1000)::bigint / $1
		ORDER BY 1 DESC LIMIT 1`, window.Milliseconds()).Scan(&most, &where)
	testenv.Must(t, err, "tokens per key per window")
	// A row's state_changed_at is its transaction's start; the margin covers
	// a batch transaction that began before the request and committed after.
	const margin = 500 * time.Millisecond
	dead := 0
	for d, sent := range lastSent {
		var state string
		var changed time.Time
		err := e.pool.QueryRow(context.Background(), `SELECT state, state_changed_at FROM tokens WHERE token_digest = $1`, d[:]).Scan(&state, &changed)
		testenv.Must(t, err, "token row")
		if state != "ACTIVE" && changed.Before(sent.Add(-margin)) {
			dead++
		}
	}
	t.Logf("%d requests, %d distinct tokens; most per key per window: %d (%s); handed out dead: %d",
		requests, len(lastSent), most, where, dead)
	if most > 2 {
		t.Errorf("a key got %d distinct tokens in one window (%s), want at most 2", most, where)
	}
	if dead > 0 {
		t.Errorf("%d tokens were handed out after their row stopped being ACTIVE", dead)
	}
}

func hostOf(base string) string {
	u, _ := url.Parse(base)
	return u.Host
}

// TestSignInsNeverShareARefreshToken: a refresh token has one holder, so two
// sign-ins in the same coalescing window (two devices) get separate
// families. Sharing one would make the second device's first refresh look
// like reuse once the first device rotated, and revoke both.
func TestSignInsNeverShareARefreshToken(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, func(c *issuer.Config) { c.CoalesceWindow = time.Minute; c.RefreshGrace = 200 * time.Millisecond })
	withClock(e)
	phone, tablet := e.password(t, e.srv.URL), e.password(t, e.srv.URL)
	if phone.body["refresh_token"] == tablet.body["refresh_token"] {
		t.Fatal("two sign-ins got the same refresh token")
	}
	rotated := e.refreshWith(t, e.srv.URL, phone.body["refresh_token"].(string))
	if rotated.status != 200 {
		t.Fatalf("phone's refresh = %d %v", rotated.status, rotated.body)
	}
	time.Sleep(400 * time.Millisecond) // past the phone's grace window
	if a := e.refreshWith(t, e.srv.URL, tablet.body["refresh_token"].(string)); a.status != 200 {
		t.Fatalf("tablet's first refresh = %d %v, want 200", a.status, a.body)
	}
	if a := e.refreshWith(t, e.srv.URL, rotated.body["refresh_token"].(string)); a.status != 200 {
		t.Fatalf("phone's next refresh after the tablet's = %d %v, want 200", a.status, a.body)
	}
}
