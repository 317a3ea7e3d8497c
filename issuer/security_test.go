package issuer_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestIntrospectionOfOtherClientsTokensNeedsPermission: a client without the
// introspect permission learns nothing about another client's access or
// refresh token (only active=false, as for a token that does not exist),
// while it may still introspect its own; a resource server (a client with
// the permission) introspects every client's tokens.
func TestIntrospectionOfOtherClientsTokensNeedsPermission(t *testing.T) {
	t.Parallel()
	e, p := lifecycleEnv(t, nil)
	pair := e.password(t, e.srv.URL)
	own := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("narrow", e.narrow)).token(t)
	// Both ways an answer can be made: from the token alone (queued) and
	// from its row.
	for _, phase := range []string{"queued", "persisted"} {
		if phase == "persisted" {
			p.Start(t, 1)
			p.Drained(t)
		}
		for name, tok := range map[string]string{"access": pair.token(t), "refresh": pair.body["refresh_token"].(string)} {
			a := e.to(t, e.srv.URL, "/oauth2/introspect", url.Values{"token": {tok}}, basic("narrow", e.narrow))
			if a.status != 200 || len(a.body) != 1 || a.body["active"] != false {
				t.Fatalf("%s: a client without the permission introspects another client's %s token as %d %v, want only active=false",
					phase, name, a.status, a.body)
			}
		}
		if a := e.to(t, e.srv.URL, "/oauth2/introspect", url.Values{"token": {own}}, basic("narrow", e.narrow)); a.body["active"] != true || a.body["client_id"] != "narrow" {
			t.Fatalf("%s: a client introspects its own token as %d %v", phase, a.status, a.body)
		}
		if a := e.introspect(t, pair.token(t)); a.body["active"] != true || a.body["sub"] != "alice" {
			t.Fatalf("%s: a resource server introspects a token as %v", phase, a.body)
		}
	}
}

// TestAccountNeverReachesClientCredentialsTokens: a user whose name equals a
// client's id (possible in a database from before the two namespaces were
// kept apart) neither sees nor revokes that client's own client_credentials
// tokens through /account, and an admin cannot through /admin/users either.
func TestAccountNeverReachesClientCredentialsTokens(t *testing.T) {
	t.Parallel()
	e, p := lifecycleEnv(t, nil)
	ctx := context.Background()
	// The password hash of userPassword, copied from alice: this user is
	// written the way an old database could hold it, past today's checks.
	_, err := e.pool.Exec(ctx, `ALTER TABLE users DISABLE TRIGGER USER`)
	testenv.Must(t, err, "disable user triggers")
	_, err = e.pool.Exec(ctx, `INSERT INTO users (username, password_hash) SELECT 'narrow', password_hash FROM users WHERE username = 'alice'`)
	testenv.Must(t, err, "add user narrow")
	_, err = e.pool.Exec(ctx, `ALTER TABLE users ENABLE TRIGGER USER`)
	testenv.Must(t, err, "enable user triggers")

	tok := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}, basic("narrow", e.narrow)).token(t)
	p.Start(t, 1)
	p.Drained(t)
	asNarrowUser := func(r *http.Request) { r.SetBasicAuth("narrow", userPassword) }
	admin := func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+adminToken) }
	for path, auth := range map[string]func(*http.Request){
		"/account/applications":            asNarrowUser,
		"/admin/users/narrow/applications": admin,
	} {
		r, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
		auth(r)
		a := do(t, r)
		if l, _ := a.body["applications"].([]any); a.status != 200 || len(l) != 0 {
			t.Fatalf("GET %s = %d %v, want no applications: a client's own tokens are not a user's", path, a.status, a.body)
		}
	}
	for path, auth := range map[string]func(*http.Request){
		"/account/applications/narrow":            asNarrowUser,
		"/admin/users/narrow/applications/narrow": admin,
	} {
		r, _ := http.NewRequest(http.MethodDelete, e.srv.URL+path, nil)
		auth(r)
		if a := do(t, r); a.status != 404 {
			t.Fatalf("DELETE %s = %d %v, want 404", path, a.status, a.body)
		}
	}
	if s := e.state(t, tok); s != "ACTIVE" {
		t.Fatalf("the client's own token is %s after its namesake user removed the application", s)
	}
	e.noGrantRevocations(t)
}

// TestRevokingUnknownApplicationWritesNothing: removing an application the
// user never used, or naming a client that does not exist, answers 404 and
// writes no revocation; a malformed name answers 400 before any database
// work, on the account and the admin routes alike.
func TestRevokingUnknownApplicationWritesNothing(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	user := func(r *http.Request) { r.SetBasicAuth("alice", userPassword) }
	admin := func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+adminToken) }
	long := strings.Repeat("x", 8000)
	cases := []struct {
		method, path string
		auth         func(*http.Request)
		want         int
	}{
		{http.MethodDelete, "/account/applications/no-such-client", user, 404},
		{http.MethodDelete, "/account/applications/" + long, user, 400},
		{http.MethodDelete, "/account/applications/%C3%28", user, 400}, // invalid UTF-8
		{http.MethodDelete, "/admin/users/alice/applications/no-such-client", admin, 404},
		{http.MethodDelete, "/admin/users/alice/applications/" + long, admin, 400},
		{http.MethodDelete, "/admin/users/" + long + "/applications/app", admin, 400},
		{http.MethodDelete, "/admin/clients/no-such-client/tokens", admin, 404},
		{http.MethodDelete, "/admin/clients/" + long + "/tokens", admin, 400},
		{http.MethodDelete, "/admin/clients/app/tokens?sub=" + long, admin, 400},
		{http.MethodGet, "/admin/users/" + long + "/applications", admin, 400},
		{http.MethodGet, "/admin/clients/" + long + "/tokens", admin, 400},
		{http.MethodGet, "/admin/clients/app/tokens?sub=" + long, admin, 400},
	}
	for _, c := range cases {
		r, _ := http.NewRequest(c.method, e.srv.URL+c.path, nil)
		c.auth(r)
		if a := do(t, r); a.status != c.want {
			t.Fatalf("%s %.80s = %d %v, want %d", c.method, c.path, a.status, a.body, c.want)
		}
	}
	e.noGrantRevocations(t)

	// A user who holds a token of a client may remove it, even right after
	// the grant while the token is still queued: the client exists.
	e.password(t, e.srv.URL)
	r, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/account/applications/app", nil)
	user(r)
	if a := do(t, r); a.status != 200 {
		t.Fatalf("removing an application in use = %d %v", a.status, a.body)
	}
}

func (e *env) noGrantRevocations(t *testing.T) {
	t.Helper()
	var n int
	testenv.Must(t, e.pool.QueryRow(context.Background(), `SELECT count(*) FROM revoked_grants`).Scan(&n), "count revoked_grants")
	if n != 0 {
		t.Fatalf("%d grant revocations written, want none", n)
	}
}
