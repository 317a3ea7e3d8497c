package issuer_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// loginEnv is newEnv in async mode with tuned sign-in settings.
func loginEnv(t *testing.T, tune func(*issuer.Config)) *env {
	t.Helper()
	_, pool := testenv.Database(t)
	nc, _, topo := testenv.JetStream(t)
	cfg := config(topo, issuer.ModeAsync)
	tune(&cfg)
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	return startEnv(t, pool, nc, js, topo, cfg)
}

// fromAddr sends the request as if a proxy had received it from addr.
func fromAddr(addr string) func(*http.Request) {
	return func(r *http.Request) {
		if addr != "" {
			r.Header.Set("X-Forwarded-For", addr)
		}
	}
}

// account signs in to the account API as user.
func (e *env) account(t *testing.T, user, pass, from string) answer {
	t.Helper()
	a, err := e.sendAccount(user, pass, from)
	testenv.Must(t, err, "account request")
	return a
}

func (e *env) sendAccount(user, pass, from string) (answer, error) {
	r, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/account/applications", nil)
	r.SetBasicAuth(user, pass)
	fromAddr(from)(r)
	return send(r)
}

// grant asks for a token with the password grant, as client "app".
func (e *env) grant(t *testing.T, user, pass, from string) answer {
	t.Helper()
	a, err := e.sendGrant(user, pass, from)
	testenv.Must(t, err, "token request")
	return a
}

func (e *env) sendGrant(user, pass, from string) (answer, error) {
	r := e.form(url.Values{"grant_type": {"password"}, "username": {user}, "password": {pass}, "scope": {"read"}}.Encode(),
		basic("app", e.secret), fromAddr(from))
	return send(r)
}

// checkThrottled asserts a 429 with Retry-After and an RFC 6749 error body.
func checkThrottled(t *testing.T, what string, a answer) {
	t.Helper()
	if a.status != http.StatusTooManyRequests || a.body["error"] != "slow_down" || a.header.Get("Retry-After") == "" {
		t.Fatalf("%s = %d %v (Retry-After %q), want 429 slow_down with Retry-After", what, a.status, a.body, a.header.Get("Retry-After"))
	}
}

// TestPasswordGuessingIsThrottledByDefault: with the default settings, an
// online guesser of one user's password is stopped after a handful of tries;
// it was not (30 wrong passwords, then the right one accepted). Without a
// trusted proxy configured, X-Forwarded-For is not believed, so a fresh
// forged address per try does not escape the count.
func TestPasswordGuessingIsThrottledByDefault(t *testing.T) {
	t.Parallel()
	e := newEnv(t, issuer.ModeAsync)
	var statuses []int
	for i := range 10 {
		statuses = append(statuses, e.account(t, "alice", "wrong password", fmt.Sprintf("203.0.113.%d", i)).status)
	}
	if statuses[len(statuses)-1] != http.StatusTooManyRequests {
		t.Fatalf("10 wrong passwords answered %v, want 429 at the end", statuses)
	}
	checkThrottled(t, "the right password while backing off", e.account(t, "alice", userPassword, "198.51.100.1"))
}

// TestWrongPasswordsBackOffAcrossEndpoints: the password grant and the
// account API share one count. Past the free failures the right password is
// refused too, until the back-off has passed; other users and other sources
// are not affected; a sign-in starts the count again.
func TestWrongPasswordsBackOffAcrossEndpoints(t *testing.T) {
	t.Parallel()
	trusted, err := proxy.Parse("127.0.0.1")
	testenv.Must(t, err, "trusted proxies")
	e := loginEnv(t, func(c *issuer.Config) {
		c.Login.PerUserSource, c.Login.PerUser, c.Login.PerSource = 3, 100, 100
		c.Login.Backoff, c.Login.MaxBackoff = time.Second, 2*time.Second
		c.TrustedProxies = trusted
	})
	testenv.Must(t, clients.AddUser(context.Background(), e.pool, "bob", "bob's password", 4), "add bob")
	const attacker = "192.0.2.66"
	for i, a := range []answer{
		e.account(t, "alice", "guess 1", attacker),
		e.grant(t, "alice", "guess 2", attacker),
		e.account(t, "alice", "guess 3", attacker),
	} {
		if a.status != http.StatusUnauthorized && a.body["error"] != "invalid_grant" {
			t.Fatalf("wrong password %d = %d %v", i+1, a.status, a.body)
		}
	}
	refusedAt := time.Now()
	grant := e.grant(t, "alice", userPassword, attacker)
	checkThrottled(t, "password grant with the right password", grant)
	if got := grant.header.Get("Retry-After"); got != "1" {
		t.Fatalf("Retry-After = %q, want 1 (the 1 s back-off)", got)
	}
	checkThrottled(t, "account API with the right password", e.account(t, "alice", userPassword, attacker))
	if a := e.grant(t, "bob", "bob's password", attacker); a.status != http.StatusOK {
		t.Fatalf("another user from the same source = %d %v", a.status, a.body)
	}
	if a := e.account(t, "alice", userPassword, "198.51.100.1"); a.status != http.StatusOK {
		t.Fatalf("alice from another source = %d %v", a.status, a.body)
	}

	time.Sleep(time.Until(refusedAt.Add(time.Second + 50*time.Millisecond)))
	if a := e.account(t, "alice", userPassword, attacker); a.status != http.StatusOK {
		t.Fatalf("the right password after the back-off = %d %v", a.status, a.body)
	}
	for i := range 3 {
		if a := e.grant(t, "alice", "guess again", attacker); a.status != http.StatusBadRequest {
			t.Fatalf("wrong password %d after a sign-in = %d %v, want 400: the count starts again", i+1, a.status, a.body)
		}
	}
	checkThrottled(t, "a fourth wrong password", e.grant(t, "alice", "guess again", attacker))
	if e.metric(t, "tokenpipe_issuer_login_throttled_total", "endpoint", "token", "limit", "user_source") < 2 ||
		e.metric(t, "tokenpipe_issuer_login_throttled_total", "endpoint", "account", "limit", "user_source") < 1 {
		t.Fatal("tokenpipe_issuer_login_throttled_total did not count the refusals by endpoint")
	}
}

// TestPerUserLimitSparesTheUsersOwnSource: guesses at one user spread over
// many addresses hit the looser per-user limit, which refuses new sources
// but not one the user signed in from before, so the attack cannot lock the
// user out.
func TestPerUserLimitSparesTheUsersOwnSource(t *testing.T) {
	t.Parallel()
	trusted, err := proxy.Parse("127.0.0.0/8")
	testenv.Must(t, err, "trusted proxies")
	e := loginEnv(t, func(c *issuer.Config) {
		c.Login.PerUserSource, c.Login.PerUser, c.Login.PerSource = 5, 4, 100
		c.TrustedProxies = trusted
	})
	const home = "198.51.100.1"
	if a := e.account(t, "alice", userPassword, home); a.status != http.StatusOK {
		t.Fatalf("alice at home = %d %v", a.status, a.body)
	}
	for i := range 4 {
		if a := e.grant(t, "alice", "guess", fmt.Sprintf("192.0.2.%d", i)); a.status != http.StatusBadRequest {
			t.Fatalf("guess %d = %d %v", i+1, a.status, a.body)
		}
	}
	checkThrottled(t, "alice from a new address", e.grant(t, "alice", userPassword, "203.0.113.5"))
	if e.metric(t, "tokenpipe_issuer_login_throttled_total", "limit", "user") != 1 {
		t.Fatal("the refusal was not counted against the per-user limit")
	}
	if a := e.grant(t, "alice", userPassword, home); a.status != http.StatusOK {
		t.Fatalf("alice at home during the attack = %d %v", a.status, a.body)
	}
}

// TestPasswordCheckPoolRejectsWhenSaturated: with one password check slot
// and a 50 ms wait, concurrent sign-ins of a user hashed at a high cost are
// refused with 503 rather than queued, on both endpoints, while a
// client_credentials token, which needs no password check, is issued at
// once.
func TestPasswordCheckPoolRejectsWhenSaturated(t *testing.T) {
	t.Parallel()
	e := loginEnv(t, func(c *issuer.Config) {
		c.PasswordChecks, c.PasswordCheckWait = 1, 50*time.Millisecond
	})
	const pass = "slow user's password"
	testenv.Must(t, clients.AddUser(context.Background(), e.pool, "slow", pass, 11), "add a user hashed at cost 11")
	answers := make([]answer, 4)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				answers[i], errs[i] = e.sendGrant("slow", pass, "")
			} else {
				answers[i], errs[i] = e.sendAccount("slow", pass, "")
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	cc := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("narrow", e.narrow))
	ccTook := time.Since(start)
	wg.Wait()
	if cc.status != http.StatusOK {
		t.Fatalf("client_credentials while the password checks are saturated = %d %v", cc.status, cc.body)
	}
	ok, busy := 0, 0
	for i, a := range answers {
		testenv.Must(t, errs[i], "sign-in")
		switch {
		case a.status == http.StatusOK:
			ok++
		case a.status == http.StatusServiceUnavailable && a.body["error"] == "temporarily_unavailable" && a.header.Get("Retry-After") != "":
			busy++
		default:
			t.Fatalf("sign-in %d = %d %v (Retry-After %q)", i, a.status, a.body, a.header.Get("Retry-After"))
		}
	}
	if ok < 1 || busy < 2 {
		t.Fatalf("%d sign-ins succeeded and %d were refused as busy; want at least 1 and 2 with one slot", ok, busy)
	}
	if got := e.metric(t, "tokenpipe_issuer_password_check_rejected_total"); got != float64(busy) {
		t.Fatalf("tokenpipe_issuer_password_check_rejected_total = %v, want %d", got, busy)
	}
	t.Logf("%d signed in, %d refused; client_credentials meanwhile took %v", ok, busy, ccTook)
}
