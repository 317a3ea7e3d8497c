package issuer

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// The handler fuzz targets drive Server.Handler() (routing, the TLS guard,
// headers, parsing, authentication) with a server whose database cannot be
// reached: a pool on a Unix socket that does not exist, so every lookup
// fails at once and no Postgres is needed. What follows a successful lookup
// is covered by the tests against real Postgres; the token text itself by
// tokens' FuzzDecode and by calling introspection directly below.

const fuzzAdminToken = "fuzz-admin-token-0123456789abcdef"

func fuzzServer(f *testing.F) *Server {
	f.Helper()
	pool, err := pgxpool.New(context.Background(), "host=/nonexistent/tokenpipe-fuzz user=fuzz dbname=fuzz connect_timeout=1")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(pool.Close)
	proxies, err := proxy.Parse("10.0.0.0/8")
	if err != nil {
		f.Fatal(err)
	}
	cfg := Config{Mode: ModeSync, Keys: testenv.Keys(), MaxBodyBytes: 4096, AdminToken: fuzzAdminToken,
		RequireTLS: true, TrustedProxies: proxies, IssuerURL: "https://issuer.test", IntrospectCacheTTL: -1}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	return New(cfg, clients.NewRegistry(pool, time.Minute), nil, nil, pool, log, NewMetrics(prometheus.NewRegistry()))
}

// serveFuzz answers r and checks what every answer must hold.
func serveFuzz(t *testing.T, s *Server, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	s.Handler().ServeHTTP(w, r)
	h := w.Header()
	for k, v := range map[string]string{
		"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
		"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
	} {
		if h.Get(k) != v {
			t.Fatalf("%d answer without %s: %q", w.Code, k, h.Get(k))
		}
	}
	switch w.Code {
	case 200, 400, 404, 413, 503:
	case 301, 307, 308:
		// ServeMux sends an unclean path ("", "/a/../b") to its clean form,
		// on this host only.
		if loc := h.Get("Location"); !strings.HasPrefix(loc, "/") || strings.HasPrefix(loc, "//") {
			t.Fatalf("%d redirect to %q", w.Code, loc)
		}
	case 401:
		if h.Get("WWW-Authenticate") == "" {
			t.Fatal("401 without WWW-Authenticate")
		}
	case 405:
		if h.Get("Allow") == "" {
			t.Fatal("405 without Allow")
		}
	default:
		t.Fatalf("unexpected status %d: %s", w.Code, w.Body)
	}
	if strings.Contains(w.Body.String(), fuzzAdminToken) {
		t.Fatal("an answer holds the admin token")
	}
	if strings.HasPrefix(h.Get("Content-Type"), "application/json") {
		var body map[string]any
		if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
			t.Fatalf("%d answer is not a JSON object: %q", w.Code, w.Body)
		}
		if w.Code >= 400 {
			if code, _ := body["error"].(string); code == "" {
				t.Fatalf("%d answer without an error code: %v", w.Code, body)
			}
		}
	}
	return w
}

// fuzzRequest builds a request as a client at remote would send it, or nil
// when the input is not a request net/http could receive.
func fuzzRequest(method, target, remote string, body io.Reader) *http.Request {
	r, err := http.NewRequest(method, "http://issuer.test"+target, body)
	if err != nil || r.URL.Host != "issuer.test" {
		return nil
	}
	r.RemoteAddr = remote
	r.RequestURI = r.URL.RequestURI()
	return r
}

func forwardedHTTPS(r *http.Request, proto string) {
	if proto != "" {
		r.Header.Set("X-Forwarded-Proto", proto)
	}
}

// FuzzAccountHandler: /account with arbitrary methods, paths, credentials
// and forwarded headers. Only an https request from the trusted proxy may
// get past the TLS guard, and no answer is a success without the database.
func FuzzAccountHandler(f *testing.F) {
	s := fuzzServer(f)
	alice := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:correct horse"))
	f.Add("GET", "/account/applications", alice, "https", "10.1.2.3:5000")
	f.Add("DELETE", "/account/applications/app", alice, "https", "10.1.2.3:5000")
	f.Add("GET", "/account/applications", alice, "https", "192.0.2.1:5000")
	f.Add("GET", "/account/applications", "Basic Og==", "https", "10.0.0.1:1")
	f.Add("POST", "/account/applications/%2e%2e", "basic YWxpY2U6", "HTTPS", "[::ffff:10.0.0.1]:1")
	f.Add("GET", "/account/applications?x=1", "Bearer x", "", "10.0.0.1:1")
	f.Fuzz(func(t *testing.T, method, path, auth, proto, remote string) {
		r := fuzzRequest(method, path, remote, nil)
		if r == nil {
			return
		}
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		forwardedHTTPS(r, proto)
		w := serveFuzz(t, s, r)
		if !s.secure(r) && w.Code != 400 && w.Code != 404 && w.Code != 405 {
			t.Fatalf("insecure request got %d", w.Code)
		}
		if w.Code == 200 {
			t.Fatalf("account answer 200 without a database: %s", w.Body)
		}
	})
}

// FuzzAdminHandler: /admin with arbitrary paths, queries and Authorization
// headers. Nothing but the exact admin token under a case-insensitive
// Bearer scheme may reach the database (503 here).
func FuzzAdminHandler(f *testing.F) {
	s := fuzzServer(f)
	f.Add("GET", "/admin/clients/app/tokens?state=active&limit=10&sub=alice", "Bearer "+fuzzAdminToken)
	f.Add("GET", "/admin/clients/app/tokens?limit=0", "bearer "+fuzzAdminToken)
	f.Add("GET", "/admin/clients/app/tokens?state=bogus", "BEARER  "+fuzzAdminToken)
	f.Add("DELETE", "/admin/users/alice/applications/app", "Bearer "+fuzzAdminToken)
	f.Add("DELETE", "/admin/clients/app/tokens?sub=", "Bearer "+fuzzAdminToken+" ")
	f.Add("GET", "/admin/users/alice/applications", "Bearer "+fuzzAdminToken[:10])
	f.Add("PUT", "/admin/users/%00/applications", "Basic "+fuzzAdminToken)
	f.Fuzz(func(t *testing.T, method, target, auth string) {
		r := fuzzRequest(method, target, "10.0.0.1:1", nil)
		if r == nil {
			return
		}
		r.Header.Set("X-Forwarded-Proto", "https")
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		w := serveFuzz(t, s, r)
		token, ok := bearerToken(r)
		authorized := ok && token == fuzzAdminToken
		if w.Code == 503 && !authorized {
			t.Fatalf("reached the database without the admin token (Authorization %q)", auth)
		}
		if w.Code == 200 {
			t.Fatalf("admin answer 200 without a database: %s", w.Body)
		}
	})
}

// fuzzToken is a valid access token signed with the test keys, so the
// fuzzer starts from text that decodes.
func fuzzToken(f *testing.F) string {
	f.Helper()
	now := time.Now()
	text, err := testenv.Keys().Encode(tokens.Claims{Kind: tokens.Access, ClientID: "app", Subject: "alice", Grant: "password",
		Scope: "read write", IssuedAt: now, ExpiresAt: now.Add(time.Hour)})
	if err != nil {
		f.Fatal(err)
	}
	return text
}

func fuzzTokenEndpoint(f *testing.F, path string) {
	s := fuzzServer(f)
	tok := fuzzToken(f)
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte("app:secret"))
	form := "application/x-www-form-urlencoded"
	f.Add("token="+url.QueryEscape(tok), form, basic, "https")
	f.Add("token="+url.QueryEscape(tok)+"&token_type_hint=refresh_token&client_id=app&client_secret=s", form, "", "https")
	f.Add("token=x&client_id=app", form+"; charset=utf-8", "", "https")
	f.Add("token=&token=a", form, basic, "https")
	f.Add("%zz", form, "Basic %%%", "https")
	f.Add(`{"token":"x"}`, "application/json", basic, "http")
	f.Add(strings.Repeat("t", 5000), form, basic, "https")
	f.Fuzz(func(t *testing.T, body, contentType, auth, proto string) {
		r := fuzzRequest(http.MethodPost, path, "10.0.0.1:1", bytes.NewBufferString(body))
		if r == nil {
			return
		}
		r.Header.Set("Content-Type", contentType)
		if auth != "" {
			r.Header.Set("Authorization", auth)
		}
		forwardedHTTPS(r, proto)
		w := serveFuzz(t, s, r)
		if w.Code == 200 {
			t.Fatalf("%s answered 200 without authenticating the client: %s", path, w.Body)
		}
		if !s.secure(r) && w.Code != 400 {
			t.Fatalf("insecure request got %d", w.Code)
		}
		// What comes after authentication: deciding on the token text.
		// Invalid and expired tokens need no lookup; valid ones fail with the
		// database, never with a panic.
		form, err := url.ParseQuery(body)
		if err != nil {
			return
		}
		ans, _, err := s.introspection(context.Background(), form.Get("client_id"), form.Get("token"), time.Now())
		if err == nil && ans.Active {
			t.Fatalf("token %q active without a database", form.Get("token"))
		}
	})
}

// FuzzRevokeHandler: POST /oauth2/revoke with arbitrary bodies, content
// types, credentials and forwarded protocols.
func FuzzRevokeHandler(f *testing.F) { fuzzTokenEndpoint(f, "/oauth2/revoke") }

// FuzzIntrospectHandler: the same for POST /oauth2/introspect.
func FuzzIntrospectHandler(f *testing.F) { fuzzTokenEndpoint(f, "/oauth2/introspect") }
