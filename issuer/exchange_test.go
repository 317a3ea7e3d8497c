package issuer_test

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const accessType = "urn:ietf:params:oauth:token-type:access_token"

// rotEnv is an async issuer (persister and recovery running) with client
// "rot", allowed client_credentials, password and token exchange, and the
// rotation window under test.
func rotEnv(t *testing.T, window time.Duration, tune func(*issuer.Config)) (*env, string, issuer.Config) {
	t.Helper()
	var cfg issuer.Config
	e, p := lifecycleEnv(t, func(c *issuer.Config) {
		c.RotationWindow = window
		if tune != nil {
			tune(c)
		}
		cfg = *c
	})
	p.Start(t, 1)
	secret, err := clients.Add(context.Background(), e.pool, "rot", []string{"read", "write"},
		[]string{"client_credentials", "password", tokens.GrantTokenExchange})
	testenv.Must(t, err, "add rotating client")
	return e, secret, cfg
}

func (e *env) exchangeAs(t *testing.T, base, client, secret, subject string) answer {
	t.Helper()
	return e.to(t, base, "/oauth2/token", url.Values{"grant_type": {tokens.GrantTokenExchange},
		"subject_token": {subject}, "subject_token_type": {accessType}}, basic(client, secret))
}

func (e *env) signIn(t *testing.T, client, secret string) string {
	t.Helper()
	a := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}, "scope": {"read"}}, basic(client, secret))
	return a.token(t)
}

func (e *env) active(t *testing.T, token string) bool {
	t.Helper()
	return e.introspect(t, token).body["active"] == true
}

// TestExchangeSameSuccessorAcrossInstancesAndWindowEnd: parallel exchanges
// of one token through two issuer instances all get one successor; the
// presented token stays active through its window (after the successor has
// superseded its row), then is inactive; an exchange after the window is
// refused and, as reuse, revokes the family: the successor dies too.
func TestExchangeSameSuccessorAcrossInstancesAndWindowEnd(t *testing.T) {
	t.Parallel()
	e, secret, cfg := rotEnv(t, 2*time.Second, nil)
	other := e.second(t, cfg)
	old := e.signIn(t, "rot", secret)

	const n = 12
	answers := make([]answer, n)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = e.exchangeAs(t, []string{e.srv.URL, other.URL}[i%2], "rot", secret, old)
		}()
	}
	wg.Wait()
	next := answers[0].token(t)
	for i, a := range answers {
		if a.status != 200 || a.body["access_token"] != next || a.body["issued_token_type"] != accessType {
			t.Fatalf("exchange %d = %d %v; want the same successor as exchange 0", i, a.status, a.body)
		}
	}
	if next == old {
		t.Fatal("the successor is the presented token")
	}
	testenv.Eventually(t, 10*time.Second, "successor ACTIVE, predecessor INACTIVE", func() (bool, error) {
		return e.state(t, next) == "ACTIVE" && e.state(t, old) == "INACTIVE", nil
	})
	if !e.active(t, old) || !e.active(t, next) {
		t.Fatal("inside the window both the presented token and its successor must be active")
	}
	if a := e.introspect(t, next); a.body["username"] != "alice" || a.body["scope"] != "read" || a.body["client_id"] != "rot" {
		t.Fatalf("successor introspects as %v; want rot/alice/read", a.body)
	}
	time.Sleep(2500 * time.Millisecond) // past the window
	if e.active(t, old) {
		t.Fatal("the presented token is still active after its window")
	}
	if !e.active(t, next) {
		t.Fatal("the successor died with its predecessor's window")
	}
	late := e.exchangeAs(t, e.srv.URL, "rot", secret, old)
	if late.status != 400 || late.body["error"] != "invalid_grant" {
		t.Fatalf("exchange after the window = %d %v, want invalid_grant", late.status, late.body)
	}
	if e.active(t, next) {
		t.Fatal("reuse after the window must revoke the family, the successor included")
	}
}

// TestExchangeAfterWindowOnlyRefusedWhenConfigured: RotationReuseKeeps
// refuses a late exchange without revoking anything.
func TestExchangeAfterWindowOnlyRefusedWhenConfigured(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 500*time.Millisecond, func(c *issuer.Config) { c.RotationReuseKeeps = true })
	old := e.signIn(t, "rot", secret)
	next := e.exchangeAs(t, e.srv.URL, "rot", secret, old).token(t)
	time.Sleep(time.Second)
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, old); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("late exchange = %d %v, want invalid_grant", a.status, a.body)
	}
	if !e.active(t, next) {
		t.Fatal("a refused late exchange revoked the successor although reuse is configured to keep it")
	}
	// The chain goes on: the successor is exchanged in turn.
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, next); a.status != 200 {
		t.Fatalf("exchange of the successor = %d %v", a.status, a.body)
	}
}

// TestExchangeAfterWindowByValidatingCallerOnlyRefused: a resource server
// validated the token inside its window and exchanges it after its handler
// ran past the window's end (tokenpipe_validated): refused, and the family,
// which its client holds on with the successor, is not revoked. The same
// late exchange without the parameter still revokes it.
func TestExchangeAfterWindowByValidatingCallerOnlyRefused(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 500*time.Millisecond, nil)
	old := e.signIn(t, "rot", secret)
	next := e.exchangeAs(t, e.srv.URL, "rot", secret, old).token(t)
	time.Sleep(time.Second) // past the window
	a := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {tokens.GrantTokenExchange},
		"subject_token": {old}, "subject_token_type": {accessType}, "tokenpipe_validated": {"true"}}, basic("rot", secret))
	if a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("late exchange by a validating caller = %d %v, want invalid_grant", a.status, a.body)
	}
	if !e.active(t, next) {
		t.Fatal("a late exchange by a caller that validated the token revoked its family")
	}
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, old); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("late exchange = %d %v, want invalid_grant", a.status, a.body)
	}
	if e.active(t, next) {
		t.Fatal("a late exchange without tokenpipe_validated must still revoke the family")
	}
}

// TestExchangeWindowPerClient: a client's own rotation window decides its
// tokens' window end, the issuer's applies to a client without one, and a
// client window not shorter than the stream's duplicate window (2m in
// tests) is ignored for the issuer's. Each client's token is exchanged
// once; past the short window only the short-window client's is inactive.
func TestExchangeWindowPerClient(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 3*time.Second, nil)
	ctx := context.Background()
	short, long := 300*time.Millisecond, 3*time.Minute
	exchangeGrants := []string{"password", tokens.GrantTokenExchange}
	shortSecret, err := clients.AddWith(ctx, e.pool, "quick", []string{"read"}, exchangeGrants, clients.Options{RotationWindow: &short})
	testenv.Must(t, err, "add quick")
	longSecret, err := clients.AddWith(ctx, e.pool, "slow", []string{"read"}, exchangeGrants, clients.Options{RotationWindow: &long})
	testenv.Must(t, err, "add slow")

	olds := map[string]string{}
	for id, sec := range map[string]string{"rot": secret, "quick": shortSecret, "slow": longSecret} {
		olds[id] = e.signIn(t, id, sec)
		if a := e.exchangeAs(t, e.srv.URL, id, sec, olds[id]); a.status != 200 {
			t.Fatalf("exchange of %s's token = %d %v", id, a.status, a.body)
		}
	}
	time.Sleep(time.Second) // past quick's window, inside the issuer's
	if e.active(t, olds["quick"]) {
		t.Fatal("quick's exchanged token outlived its client's 300ms window")
	}
	if !e.active(t, olds["rot"]) || !e.active(t, olds["slow"]) {
		t.Fatal("inside the issuer's 3s window the exchanged tokens of rot (no own window) and slow (ignored) must be active")
	}
	time.Sleep(2500 * time.Millisecond) // past the issuer's window
	if e.active(t, olds["rot"]) || e.active(t, olds["slow"]) {
		t.Fatal("an exchanged token outlived the issuer's window: slow's 3m window, beyond the duplicate window, was not ignored")
	}
}

// TestExchangeRepeatSaysSuccessorExchanged: inside the window of A, once
// A's successor B was exchanged itself, a repeat exchange of A still gets B
// (A is valid) but says B was exchanged, so a resource server does not hand
// the client an older token than it has.
func TestExchangeRepeatSaysSuccessorExchanged(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 5*time.Second, nil)
	a := e.signIn(t, "rot", secret)
	first := e.exchangeAs(t, e.srv.URL, "rot", secret, a)
	b := first.token(t)
	if first.body["tokenpipe_successor_exchanged"] != nil {
		t.Fatalf("first exchange says its successor was exchanged: %v", first.body)
	}
	c := e.exchangeAs(t, e.srv.URL, "rot", secret, b).token(t)
	again := e.exchangeAs(t, e.srv.URL, "rot", secret, a)
	if again.token(t) != b || again.body["tokenpipe_successor_exchanged"] != true {
		t.Fatalf("repeat exchange of A = %v; want B with tokenpipe_successor_exchanged", again.body)
	}
	testenv.Eventually(t, 10*time.Second, "C ACTIVE", func() (bool, error) { return e.state(t, c) == "ACTIVE", nil })
	for name, tok := range map[string]string{"A": a, "B": b, "C": c} {
		if !e.active(t, tok) {
			t.Fatalf("%s inactive inside the windows of the chain", name)
		}
	}
}

// TestExchangeAttacks: what must never be exchanged.
func TestExchangeAttacks(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 5*time.Second, nil)
	ctx := context.Background()
	other, err := clients.Add(ctx, e.pool, "rot2", []string{"read"}, []string{"password", "refresh_token", tokens.GrantTokenExchange})
	testenv.Must(t, err, "add second client")
	mine := e.signIn(t, "rot", secret)

	refused := func(name string, a answer, code string) {
		t.Helper()
		if a.status != 400 || a.body["error"] != code {
			t.Errorf("%s = %d %v, want 400 %s", name, a.status, a.body, code)
		}
	}
	refused("another client's token", e.exchangeAs(t, e.srv.URL, "rot2", other, mine), "invalid_grant")
	refused("a client without the grant", e.exchangeAs(t, e.srv.URL, "app", e.secret, mine), "unauthorized_client")
	rt := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}, "scope": {"read"}}, basic("rot2", other)).body["refresh_token"].(string)
	refused("a refresh token", e.exchangeAs(t, e.srv.URL, "rot2", other, rt), "invalid_grant")
	refused("garbage", e.exchangeAs(t, e.srv.URL, "rot", secret, "not-a-token"), "invalid_grant")
	bad := url.Values{"grant_type": {tokens.GrantTokenExchange}, "subject_token": {mine}, "subject_token_type": {"urn:ietf:params:oauth:token-type:refresh_token"}}
	refused("wrong subject_token_type", e.to(t, e.srv.URL, "/oauth2/token", bad, basic("rot", secret)), "invalid_request")
	widen := url.Values{"grant_type": {tokens.GrantTokenExchange}, "subject_token": {mine}, "subject_token_type": {accessType}, "scope": {"read write"}}
	refused("a wider scope", e.to(t, e.srv.URL, "/oauth2/token", widen, basic("rot", secret)), "invalid_target")

	revoked := e.signIn(t, "rot", secret)
	e.to(t, e.srv.URL, "/oauth2/revoke", url.Values{"token": {revoked}}, basic("rot", secret))
	refused("a revoked token", e.exchangeAs(t, e.srv.URL, "rot", secret, revoked), "invalid_grant")

	// Another device signs in for the same key: the earlier token is
	// INACTIVE and must not be exchanged, inside a window or not.
	superseded := e.signIn(t, "rot", secret)
	newer := e.signIn(t, "rot", secret)
	testenv.Eventually(t, 10*time.Second, "superseded", func() (bool, error) { return e.state(t, superseded) == "INACTIVE", nil })
	refused("an INACTIVE token", e.exchangeAs(t, e.srv.URL, "rot", secret, superseded), "invalid_grant")
	if !e.active(t, newer) {
		t.Fatal("refusing the INACTIVE token's exchange hurt the key's ACTIVE token")
	}

	removed := e.signIn(t, "rot", secret)
	testenv.Must(t, clients.RemoveUser(ctx, e.pool, "alice"), "remove user")
	refused("a removed user's token", e.exchangeAs(t, e.srv.URL, "rot", secret, removed), "invalid_grant")

	c, err := testenv.Keys().Decode(newer)
	testenv.Must(t, err, "decode")
	c.IssuedAt, c.ExpiresAt = c.IssuedAt.Add(-2*time.Hour), c.ExpiresAt.Add(-2*time.Hour)
	expired, err := testenv.Keys().Encode(c)
	testenv.Must(t, err, "encode")
	refused("an expired token", e.exchangeAs(t, e.srv.URL, "rot", secret, expired), "invalid_grant")
	if n := e.countRowsWithGrant(t, tokens.GrantTokenExchange); n != 0 {
		t.Fatalf("refused exchanges minted %d tokens", n)
	}
}

func (e *env) countRowsWithGrant(t *testing.T, grant string) int {
	t.Helper()
	var n int
	testenv.Must(t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM tokens WHERE grant_type = $1`, grant).Scan(&n), "count")
	return n
}

// TestExchangeGrantRevocationKillsBoth: revoking the user's grant inside the
// window ends the presented token and its successor at once.
func TestExchangeGrantRevocationKillsBoth(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, 5*time.Second, nil)
	old := e.signIn(t, "rot", secret)
	next := e.exchangeAs(t, e.srv.URL, "rot", secret, old).token(t)
	_, err := grants.Revoke(context.Background(), e.pool, e.js, e.topo.Stream, "rot", "alice", "test")
	testenv.Must(t, err, "revoke grant")
	if e.active(t, old) || e.active(t, next) {
		t.Fatal("a grant revocation inside the window left the presented token or its successor active")
	}
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, old); a.status != 400 {
		t.Fatalf("exchange after the grant revocation = %d %v", a.status, a.body)
	}
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, next); a.status != 400 {
		t.Fatalf("exchange of the successor after the grant revocation = %d %v", a.status, a.body)
	}
}

// TestExchangeWithoutWindowEndsAtAnswer: a zero window (RotationWindow < 0)
// ends the presented token as soon as its successor was handed out.
func TestExchangeWithoutWindowEndsAtAnswer(t *testing.T) {
	t.Parallel()
	e, secret, _ := rotEnv(t, -1, nil)
	old := e.signIn(t, "rot", secret)
	next := e.exchangeAs(t, e.srv.URL, "rot", secret, old).token(t)
	if e.active(t, old) {
		t.Fatal("without a window the presented token must end with the answer")
	}
	if !e.active(t, next) {
		t.Fatal("successor inactive")
	}
	if a := e.exchangeAs(t, e.srv.URL, "rot", secret, old); a.status != http.StatusBadRequest {
		t.Fatalf("second exchange without a window = %d %v", a.status, a.body)
	}
}

// cancelAfterExchangeRecorded cancels the request whose query recorded an
// exchange, right after it: the moment a resource server whose client went
// away would cancel the exchange.
type cancelAfterExchangeRecorded struct{}

func (cancelAfterExchangeRecorded) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (cancelAfterExchangeRecorded) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryEndData) {
	if strings.Contains(d.CommandTag.String(), "INSERT") {
		if cancel, ok := ctx.Value(cancelKey{}).(context.CancelFunc); ok {
			cancel()
		}
	}
}

// TestExchangeAbandonedByCallerKeepsToken: an exchange whose caller went
// away before the answer hands nothing out and starts no window: the
// presented token stays active past the window, a retry gets the successor,
// and only then does the window run.
func TestExchangeAbandonedByCallerKeepsToken(t *testing.T) {
	t.Parallel()
	e, secret, cfg := rotEnv(t, 300*time.Millisecond, nil)
	pcfg := e.pool.Config()
	pcfg.ConnConfig.Tracer = cancelAfterExchangeRecorded{}
	traced, err := pgxpool.NewWithConfig(context.Background(), pcfg)
	testenv.Must(t, err, "traced pool")
	t.Cleanup(traced.Close)
	js, err := issuer.NewJetStream(e.js.Conn(), cfg)
	testenv.Must(t, err, "jetstream")
	iss := issuer.New(cfg, clients.NewRegistry(traced, time.Minute), e.js.Conn(), js, traced,
		slog.New(slog.NewTextHandler(e.logs, nil)), issuer.NewMetrics(prometheus.NewRegistry()))
	h := iss.Handler()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		h.ServeHTTP(w, r.WithContext(context.WithValue(ctx, cancelKey{}, cancel)))
	}))
	t.Cleanup(srv.Close)

	old := e.signIn(t, "rot", secret)
	if a := e.exchangeAs(t, srv.URL, "rot", secret, old); a.status != http.StatusServiceUnavailable {
		t.Fatalf("exchange abandoned by its caller = %d %v, want 503 (nothing handed out)", a.status, a.body)
	}
	time.Sleep(600 * time.Millisecond) // past the window, had it started
	if !e.active(t, old) {
		t.Fatal("an exchange nobody received ended the presented token")
	}
	next := e.exchangeAs(t, e.srv.URL, "rot", secret, old)
	if next.status != 200 {
		t.Fatalf("retry of the abandoned exchange = %d %v", next.status, next.body)
	}
	time.Sleep(600 * time.Millisecond)
	if e.active(t, old) {
		t.Fatal("the presented token outlived the window of its answered exchange")
	}
	if !e.active(t, next.token(t)) {
		t.Fatal("successor inactive")
	}
}

// TestAbandonedExchangeDoesNotReviveRefreshedToken: an access token whose
// exchange was recorded but never answered (its caller went away after
// store.RecordExchange, the exchange's first step) and that a refresh of
// its own family then superseded is dead like any superseded token: it
// neither introspects active nor can be exchanged for a successor that
// would take the key back from the refreshed one.
func TestAbandonedExchangeDoesNotReviveRefreshedToken(t *testing.T) {
	t.Parallel()
	e, _, _ := rotEnv(t, 2*time.Second, nil)
	ctx := context.Background()
	secret, err := clients.Add(ctx, e.pool, "rot3", []string{"read"}, []string{"password", "refresh_token", tokens.GrantTokenExchange})
	testenv.Must(t, err, "add client")
	signIn := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"},
		"password": {userPassword}}, basic("rot3", secret))
	old, refresh := signIn.token(t), signIn.body["refresh_token"].(string)
	c, err := testenv.Keys().Decode(old)
	testenv.Must(t, err, "decode")
	if _, first, err := store.RecordExchange(ctx, e.pool, events.DigestOf(old), c.ExpiresAt); err != nil || !first {
		t.Fatalf("record the abandoned exchange: first=%v err=%v", first, err)
	}
	refreshed := e.to(t, e.srv.URL, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}},
		basic("rot3", secret)).token(t)
	testenv.Eventually(t, 10*time.Second, "refreshed token ACTIVE, the old one INACTIVE", func() (bool, error) {
		return e.state(t, refreshed) == "ACTIVE" && e.state(t, old) == "INACTIVE", nil
	})
	if e.active(t, old) {
		t.Fatal("a token superseded by its family's refresh introspects active (an abandoned exchange revived it)")
	}
	if a := e.exchangeAs(t, e.srv.URL, "rot3", secret, old); a.status != 400 || a.body["error"] != "invalid_grant" {
		t.Fatalf("exchange of the superseded token = %d %v, want invalid_grant", a.status, a.body)
	}
}
