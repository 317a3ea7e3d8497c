package pages_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPagesResistAttacks attacks the pages over plain HTTP, one attack per
// subtest, against one real issuer: CSRF, login CSRF, session fixation,
// cookie tampering, sign-out replay, cross-user and cross-area access, open
// redirects, brute force through the form, and the headers.
func TestPagesResistAttacks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	access, refresh := e.signInApp(t, "alice", alicePassword)
	listed := func(p page) bool { return strings.Contains(p.body, `id="app-mobile"`) }

	t.Run("csrf", func(t *testing.T) {
		b := e.browser(t)
		home := b.signIn("/account", "alice", alicePassword)
		if !listed(home) {
			t.Fatalf("alice's application is not listed: %s", home.body)
		}
		other := e.browser(t).signIn("/account", "bob", bobPassword).csrf(t)
		for name, form := range map[string]url.Values{
			"missing":            {"client": {"mobile"}},
			"wrong":              {"client": {"mobile"}, "csrf": {"AAAA"}},
			"another session's":  {"client": {"mobile"}, "csrf": {other}},
			"the sign-in form's": {"client": {"mobile"}, "csrf": {e.browser(t).get("/account").csrf(t)}},
			"empty":              {"client": {"mobile"}, "csrf": {""}},
		} {
			if got := b.post("/account/remove", form); got.status != http.StatusForbidden {
				t.Errorf("remove with a %s CSRF token = %d, want 403", name, got.status)
			}
		}
		if got := b.post("/account/signout", url.Values{}); got.status != http.StatusForbidden {
			t.Errorf("sign-out without a CSRF token = %d, want 403", got.status)
		}
		// A cross-site form post with the right token (a browser says
		// where it came from) is refused too.
		b.header.Set("Sec-Fetch-Site", "cross-site")
		if got := b.post("/account/remove", url.Values{"client": {"mobile"}, "csrf": {home.csrf(t)}}); got.status != http.StatusForbidden {
			t.Errorf("cross-site remove = %d, want 403", got.status)
		}
		b.header.Del("Sec-Fetch-Site")
		if !listed(b.get("/account")) || !e.active(t, access) {
			t.Fatal("a refused form removed the application")
		}
	})

	t.Run("login csrf", func(t *testing.T) {
		// Another site cannot sign a victim in to the attacker's account:
		// the sign-in form needs the pre-session cookie's token.
		b := e.browser(t)
		got := b.post("/account/signin", url.Values{"username": {"bob"}, "password": {bobPassword}})
		if got.status != http.StatusForbidden {
			t.Fatalf("sign-in without the form's token = %d, want 403", got.status)
		}
		if b.cookie("/account", "tokenpipe_account") != "" {
			t.Fatal("a refused sign-in set a session cookie")
		}
	})

	t.Run("session fixation", func(t *testing.T) {
		b := e.browser(t)
		planted := "Zml4ZWQtYnktdGhlLWF0dGFja2VyLTAxMjM0NTY3ODk"
		b.setCookie("/account", "tokenpipe_account", planted)
		b.signIn("/account", "alice", alicePassword)
		if got := b.cookie("/account", "tokenpipe_account"); got == planted || got == "" {
			t.Fatalf("session cookie after sign-in = %q: the planted id was kept", got)
		}
		attacker := e.browser(t)
		attacker.setCookie("/account", "tokenpipe_account", planted)
		if listed(attacker.get("/account")) {
			t.Fatal("the planted session id opened alice's page")
		}
		// Signing in again ends the browser's previous session.
		first := b.cookie("/account", "tokenpipe_account")
		tab := e.browser(t) // a second tab's sign-in form: its cookie and token
		form := tab.get("/account")
		b.setCookie("/account", "tokenpipe_account_signin", tab.cookie("/account", "tokenpipe_account_signin"))
		if got := b.post("/account/signin", url.Values{"csrf": {form.csrf(t)}, "username": {"alice"}, "password": {alicePassword}}); got.status != http.StatusSeeOther {
			t.Fatalf("second sign-in = %d", got.status)
		}
		old := e.browser(t)
		old.setCookie("/account", "tokenpipe_account", first)
		if listed(old.get("/account")) {
			t.Fatal("the session before a second sign-in still opens the page")
		}
	})

	t.Run("cookie tampering and sign-out replay", func(t *testing.T) {
		b := e.browser(t)
		home := b.signIn("/account", "alice", alicePassword)
		id := b.cookie("/account", "tokenpipe_account")
		for _, forged := range []string{flip(id), id[:len(id)-2], id + "A", "", "%00", strings.Repeat("A", 4000)} {
			m := e.browser(t)
			m.setCookie("/account", "tokenpipe_account", forged)
			if p := m.get("/account"); p.status != 200 || listed(p) || !strings.Contains(p.body, `action="/account/signin"`) {
				t.Errorf("tampered cookie %.20q: %d, listed %v", forged, p.status, listed(p))
			}
		}
		if got := b.post("/account/signout", url.Values{"csrf": {home.csrf(t)}}); got.status != http.StatusSeeOther {
			t.Fatalf("sign-out = %d", got.status)
		}
		replay := e.browser(t)
		replay.setCookie("/account", "tokenpipe_account", id)
		if listed(replay.get("/account")) {
			t.Fatal("a signed-out session's cookie still opens the page")
		}
		if got := replay.post("/account/remove", url.Values{"client": {"mobile"}, "csrf": {home.csrf(t)}}); got.status != http.StatusForbidden {
			t.Fatalf("remove with a signed-out session = %d, want 403", got.status)
		}
	})

	t.Run("cross-user and cross-area", func(t *testing.T) {
		bob := e.browser(t)
		home := bob.signIn("/account", "bob", bobPassword)
		if listed(home) {
			t.Fatal("bob sees alice's application")
		}
		// The form names only the client; a user field is ignored.
		bob.post("/account/remove", url.Values{"client": {"mobile"}, "user": {"alice"}, "sub": {"alice"}, "csrf": {home.csrf(t)}})
		if !e.active(t, access) {
			t.Fatal("bob's form revoked alice's token")
		}
		// An account session, even an administrator's, is no admin session.
		ops := e.browser(t)
		ops.signIn("/account", "ops", adminPassword)
		stolen := e.browser(t)
		stolen.setCookie("/admin", "tokenpipe_admin", ops.cookie("/account", "tokenpipe_account"))
		if p := stolen.get("/admin"); strings.Contains(p.body, "Turn refresh") {
			t.Fatal("an account session opened the admin page")
		}
		// A user with the right password who is no administrator.
		p := bob.post("/admin/signin", url.Values{"csrf": {bob.get("/admin").csrf(t)}, "username": {"bob"}, "password": {bobPassword}})
		if p.status != http.StatusUnauthorized || bob.cookie("/admin", "tokenpipe_admin") != "" {
			t.Fatalf("bob at /admin = %d", p.status)
		}
		// Admin forms without an admin session do nothing.
		for _, path := range []string{"/admin/grant", "/admin/revoke", "/admin/user/remove"} {
			if got := bob.post(path, url.Values{"client": {"mobile"}, "grant": {"refresh_token"}, "allow": {"off"}, "name": {"alice"}, "csrf": {home.csrf(t)}}); got.status != http.StatusForbidden {
				t.Errorf("POST %s as bob = %d, want 403", path, got.status)
			}
		}
		if !e.active(t, access) {
			t.Fatal("an admin form without an admin session revoked a token")
		}
	})

	t.Run("open redirect", func(t *testing.T) {
		b := e.browser(t)
		form := b.get("/account?next=https://evil.example/&return_to=//evil.example")
		got := b.post("/account/signin?next=https://evil.example/", url.Values{"csrf": {form.csrf(t)}, "username": {"alice"},
			"password": {alicePassword}, "next": {"//evil.example/x"}, "redirect": {"https://evil.example"}})
		if loc := got.header.Get("Location"); loc != "/account" {
			t.Fatalf("after sign-in Location = %q, want /account", loc)
		}
		admin := e.browser(t)
		admin.signIn("/admin", "ops", adminPassword)
		p := admin.get("/admin/user/remove?name=" + url.QueryEscape("/evil.example") + "&client=mobile")
		got = admin.post("/admin/user/remove", url.Values{"csrf": {p.csrf(t)}, "name": {"//evil.example"}, "client": {"mobile"}})
		if loc := got.header.Get("Location"); !strings.HasPrefix(loc, "/admin/user?name=") {
			t.Fatalf("after an admin removal Location = %q", loc)
		}
	})

	t.Run("headers", func(t *testing.T) {
		b := e.browser(t)
		p := b.signIn("/account", "alice", alicePassword)
		h := p.header
		csp := h.Get("Content-Security-Policy")
		if !strings.Contains(csp, "frame-ancestors 'none'") || strings.Contains(csp, "unsafe-inline") || strings.Contains(csp, "script-src") ||
			!strings.Contains(csp, "default-src 'none'") {
			t.Errorf("CSP = %q", csp)
		}
		if h.Get("Cache-Control") != "no-store" || h.Get("X-Frame-Options") != "DENY" || h.Get("X-Content-Type-Options") != "nosniff" {
			t.Errorf("headers = %v", h)
		}
		for _, secret := range []string{access, refresh, e.secret, alicePassword} {
			if strings.Contains(p.body, secret) {
				t.Fatal("the page shows a token, secret or password")
			}
		}
		// Behind a TLS-terminating proxy the cookies are Secure and
		// __Secure- prefixed; always HttpOnly and SameSite=Strict.
		tls := e.browser(t)
		tls.header.Set("X-Forwarded-Proto", "https")
		form := tls.get("/account")
		got := tls.post("/account/signin", url.Values{"csrf": {form.csrf(t)}, "username": {"alice"}, "password": {alicePassword}})
		cookies := append(form.header.Values("Set-Cookie"), got.header.Values("Set-Cookie")...)
		var session string
		for _, c := range cookies {
			if !strings.Contains(c, "HttpOnly") || !strings.Contains(c, "SameSite=Strict") || !strings.Contains(c, "Secure") ||
				!strings.HasPrefix(c, "__Secure-tokenpipe_") {
				t.Errorf("cookie under TLS: %s", c)
			}
			if strings.HasPrefix(c, "__Secure-tokenpipe_account=") && !strings.Contains(c, "Max-Age=0") {
				session = c
			}
		}
		if session == "" || !strings.Contains(session, "Path=/account") {
			t.Errorf("session cookie under TLS = %q", session)
		}
	})

	t.Run("password reset ends sessions", func(t *testing.T) {
		b := e.browser(t)
		b.signIn("/account", "bob", bobPassword)
		testenv.Must(t, clients.AddUser(context.Background(), e.p.Pool, "bob", "bob's new password", 4), "reset bob")
		if p := b.get("/account"); !strings.Contains(p.body, `action="/account/signin"`) {
			t.Fatal("a session outlived its user's password reset")
		}
	})

	// Last: it leaves alice throttled.
	t.Run("brute force through the form", func(t *testing.T) {
		b := e.browser(t)
		try := func(pass string) page {
			form := b.get("/account")
			return b.post("/account/signin", url.Values{"csrf": {form.csrf(t)}, "username": {"alice"}, "password": {pass}})
		}
		for i := range perUserSource {
			if got := try("guess"); got.status != http.StatusUnauthorized {
				t.Fatalf("wrong password %d = %d, want 401", i+1, got.status)
			}
		}
		got := try(alicePassword)
		if got.status != http.StatusTooManyRequests || got.header.Get("Retry-After") == "" || !strings.Contains(got.body, "Too many failed sign-ins") {
			t.Fatalf("after %d wrong passwords the right one = %d (Retry-After %q), want 429", perUserSource, got.status, got.header.Get("Retry-After"))
		}
		if b.cookie("/account", "tokenpipe_account") != "" {
			t.Fatal("a throttled sign-in set a session cookie")
		}
	})
}

// flip changes one character of a cookie value, keeping it well-formed.
func flip(s string) string {
	c := byte('A')
	if s[5] == 'A' {
		c = 'B'
	}
	return s[:5] + string(c) + s[6:]
}
