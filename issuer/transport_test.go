package issuer_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

const testAdminToken = "admin-token-for-tests-0123456789"

// syncEnv is newEnv in sync mode (Postgres only) with cfg tuned first.
func syncEnv(t *testing.T, tune func(*issuer.Config)) *env {
	t.Helper()
	_, pool := testenv.Database(t)
	cfg := config(testenv.Topology(), issuer.ModeSync)
	cfg.AdminToken = testAdminToken
	if tune != nil {
		tune(&cfg)
	}
	return startEnv(t, pool, nil, nil, cfg.Topology, cfg)
}

func (e *env) get(t *testing.T, path string, mutate ...func(*http.Request)) answer {
	t.Helper()
	r, err := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
	testenv.Must(t, err, "request")
	for _, m := range mutate {
		m(r)
	}
	return do(t, r)
}

func asAlice(r *http.Request) { r.SetBasicAuth("alice", userPassword) }

func adminBearer(scheme string) func(*http.Request) {
	return func(r *http.Request) { r.Header.Set("Authorization", scheme+" "+testAdminToken) }
}

func forwardedProto(p string) func(*http.Request) {
	return func(r *http.Request) { r.Header.Set("X-Forwarded-Proto", p) }
}

// TestRequireTLSCoversEveryCredentialEndpoint: with RequireTLS, the
// management API (user passwords, the admin token) refuses plain HTTP like
// the token endpoint does, and so do revocation and introspection. A
// forwarded https from an address that is not a configured proxy is no
// proof of TLS.
func TestRequireTLSCoversEveryCredentialEndpoint(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, func(c *issuer.Config) { c.RequireTLS = true })
	for _, spoof := range []bool{false, true} {
		var mutate []func(*http.Request)
		if spoof {
			mutate = append(mutate, forwardedProto("https"))
		}
		if a := e.get(t, "/account/applications", append(mutate, asAlice)...); a.status != 400 || a.body["error"] != "invalid_request" {
			t.Errorf("account over plain HTTP (spoofed proxy header %v): %d %v", spoof, a.status, a.body)
		}
		if a := e.get(t, "/admin/clients/app/tokens", append(mutate, adminBearer("Bearer"))...); a.status != 400 || a.body["error"] != "invalid_request" {
			t.Errorf("admin over plain HTTP (spoofed proxy header %v): %d %v", spoof, a.status, a.body)
		}
		for _, path := range []string{"/oauth2/token", "/oauth2/revoke", "/oauth2/introspect"} {
			form := url.Values{"grant_type": {"client_credentials"}, "token": {"x"}}
			if a := e.to(t, e.srv.URL, path, form, append(mutate, basic("app", e.secret))...); a.status != 400 || a.body["error"] != "invalid_request" {
				t.Errorf("%s over plain HTTP (spoofed proxy header %v): %d %v", path, spoof, a.status, a.body)
			}
		}
	}
	// Metadata carries no credential and stays reachable.
	if a := e.get(t, "/.well-known/oauth-authorization-server"); a.status == 400 {
		t.Errorf("metadata refused over plain HTTP: %d %v", a.status, a.body)
	}
}

// TestClientSecretPostFailureChallenges: every 401 carries WWW-Authenticate
// (RFC 9110 15.5.2), also when the client authenticated in the body.
func TestClientSecretPostFailureChallenges(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, nil)
	for name, form := range map[string]url.Values{
		"wrong secret":   {"grant_type": {"client_credentials"}, "client_id": {"app"}, "client_secret": {"wrong"}},
		"unknown client": {"grant_type": {"client_credentials"}, "client_id": {"nobody"}, "client_secret": {"wrong"}},
		"no secret":      {"grant_type": {"client_credentials"}, "client_id": {"app"}},
	} {
		a := e.post(t, form)
		if a.status != 401 || a.body["error"] != "invalid_client" || a.header.Get("WWW-Authenticate") == "" {
			t.Errorf("%s: %d %v WWW-Authenticate=%q", name, a.status, a.body, a.header.Get("WWW-Authenticate"))
		}
	}
}

// TestAdminBearerSchemeIsCaseInsensitive: RFC 9110 11.1, auth schemes are
// case-insensitive.
func TestAdminBearerSchemeIsCaseInsensitive(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, nil)
	for _, scheme := range []string{"Bearer", "bearer", "BEARER"} {
		if a := e.get(t, "/admin/clients/app/tokens", adminBearer(scheme)); a.status != 200 {
			t.Errorf("scheme %q: %d %v", scheme, a.status, a.body)
		}
	}
	for _, h := range []string{"Basic " + testAdminToken, "Bearer", "Bearer  x" + testAdminToken, testAdminToken} {
		if a := e.get(t, "/admin/clients/app/tokens", func(r *http.Request) { r.Header.Set("Authorization", h) }); a.status != 401 {
			t.Errorf("Authorization %q: %d %v", h, a.status, a.body)
		}
	}
}

// TestScopeSyntaxIsStrict: RFC 6749 3.3, scope tokens of %x21 / %x23-5B /
// %x5D-7E separated by single spaces, in token and refresh requests.
func TestScopeSyntaxIsStrict(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, nil)
	bad := []string{"read\twrite", "read\nwrite", "read  write", " read", "read ", `read "write"`, `re\ad`, "réad", "read\x00"}
	for _, scope := range bad {
		a := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {scope}}, basic("app", e.secret))
		if a.status != 400 || a.body["error"] != "invalid_scope" {
			t.Errorf("scope %q: %d %v", scope, a.status, a.body)
		}
	}
	if a := e.post(t, url.Values{"grant_type": {"client_credentials"}, "scope": {"read write"}}, basic("app", e.secret)); a.status != 200 {
		t.Fatalf("scope %q: %d %v", "read write", a.status, a.body)
	}
	pw := e.post(t, url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {userPassword}, "scope": {"read write"}}, basic("app", e.secret))
	refresh, _ := pw.body["refresh_token"].(string)
	if refresh == "" {
		t.Fatalf("password grant: %d %v", pw.status, pw.body)
	}
	for _, scope := range bad {
		a := e.post(t, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}, "scope": {scope}}, basic("app", e.secret))
		if a.status != 400 || a.body["error"] != "invalid_scope" {
			t.Errorf("refresh with scope %q: %d %v", scope, a.status, a.body)
		}
	}
}

// TestMetadataIgnoresRequestHost: the issuer identifier is configuration,
// not whatever Host or X-Forwarded-Proto a request names (RFC 8414 2), and
// the document answers GET and HEAD only.
func TestMetadataIgnoresRequestHost(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, nil)
	const path = "/.well-known/oauth-authorization-server"
	a := e.get(t, path, func(r *http.Request) { r.Host = "attacker.example" }, forwardedProto("https"))
	if a.status != 200 {
		t.Fatalf("metadata: %d %v", a.status, a.body)
	}
	for k, v := range a.body {
		if s, ok := v.(string); ok && strings.Contains(s, "attacker.example") {
			t.Errorf("metadata %s = %q follows the request's Host", k, s)
		}
	}
	if iss, _ := a.body["issuer"].(string); iss != e.srv.URL {
		t.Errorf("issuer = %q, want the configured %q", iss, e.srv.URL)
	}
	for _, m := range []string{http.MethodPost, http.MethodPut, http.MethodDelete} {
		r, _ := http.NewRequest(m, e.srv.URL+path, nil)
		got := do(t, r)
		if got.status != 405 || !strings.Contains(got.header.Get("Allow"), "GET") {
			t.Errorf("%s metadata: %d Allow=%q", m, got.status, got.header.Get("Allow"))
		}
	}
	r, _ := http.NewRequest(http.MethodHead, e.srv.URL+path, nil)
	resp, err := http.DefaultClient.Do(r)
	testenv.Must(t, err, "HEAD")
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("HEAD metadata: %d", resp.StatusCode)
	}
}

// TestSecurityHeaders: every answer, success or error, carries headers that
// keep a browser from sniffing, framing or leaking it.
func TestSecurityHeaders(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, nil)
	want := map[string]string{
		"X-Content-Type-Options":  "nosniff",
		"Referrer-Policy":         "no-referrer",
		"X-Frame-Options":         "DENY",
		"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
	}
	answers := map[string]answer{
		"token":       e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret)),
		"token error": e.post(t, url.Values{"grant_type": {"nope"}}, basic("app", e.secret)),
		"metadata":    e.get(t, "/.well-known/oauth-authorization-server"),
		"account 401": e.get(t, "/account/applications"),
		"admin":       e.get(t, "/admin/clients/app/tokens", adminBearer("Bearer")),
	}
	// A plain 404 is not JSON; the headers are what matter.
	resp, err := http.Get(e.srv.URL + "/nothing-here")
	testenv.Must(t, err, "GET")
	resp.Body.Close()
	answers["not found"] = answer{status: resp.StatusCode, header: resp.Header}
	for name, a := range answers {
		for k, v := range want {
			if got := a.header.Get(k); got != v {
				t.Errorf("%s (%d): %s = %q, want %q", name, a.status, k, got, v)
			}
		}
		if got := a.header.Get("Strict-Transport-Security"); got != "" {
			t.Errorf("%s: Strict-Transport-Security over plain HTTP: %q", name, got)
		}
	}
}

// TestForwardedProtoFromTrustedProxy: X-Forwarded-Proto: https counts as
// TLS when it comes from a configured proxy (here the loopback addresses
// the test client uses), and then the answer carries HSTS.
func TestForwardedProtoFromTrustedProxy(t *testing.T) {
	t.Parallel()
	e := syncEnv(t, func(c *issuer.Config) {
		c.RequireTLS = true
		var err error
		c.TrustedProxies, err = proxy.Parse("127.0.0.0/8, ::1/128")
		testenv.Must(t, err, "trusted proxies")
	})
	https := forwardedProto("https")
	if a := e.get(t, "/account/applications", asAlice, https); a.status != 200 || a.header.Get("Strict-Transport-Security") == "" {
		t.Errorf("account through a trusted proxy: %d %v HSTS=%q", a.status, a.body, a.header.Get("Strict-Transport-Security"))
	}
	if a := e.get(t, "/admin/clients/app/tokens", adminBearer("Bearer"), https); a.status != 200 {
		t.Errorf("admin through a trusted proxy: %d %v", a.status, a.body)
	}
	if a := e.post(t, url.Values{"grant_type": {"client_credentials"}}, basic("app", e.secret), https); a.status != 200 {
		t.Errorf("token through a trusted proxy: %d %v", a.status, a.body)
	}
	if a := e.get(t, "/account/applications", asAlice, forwardedProto("http")); a.status != 400 {
		t.Errorf("trusted proxy saying http: %d %v", a.status, a.body)
	}
}

// writeSelfSigned writes a fresh self-signed certificate for 127.0.0.1 and
// its key into dir and returns the certificate's serial number.
func writeSelfSigned(t *testing.T, dir string, serial int64) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	testenv.Must(t, err, "key")
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	testenv.Must(t, err, "certificate")
	keyDER, err := x509.MarshalECPrivateKey(key)
	testenv.Must(t, err, "marshal key")
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	// Written next to the target and renamed, as a certificate manager
	// does, so a handshake never reads half a file.
	for name, block := range map[string]*pem.Block{
		certFile: {Type: "CERTIFICATE", Bytes: der},
		keyFile:  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		testenv.Must(t, os.WriteFile(name+".new", pem.EncodeToMemory(block), 0o600), "write")
		testenv.Must(t, os.Rename(name+".new", name), "rename")
	}
	return certFile, keyFile
}

// servedSerial dials addr and returns the serial of the certificate served.
func servedSerial(addr string) (int64, error) {
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // the test only reads the serial
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64(), nil
}

// TestServesTLSAndReloadsCertificate: with a certificate and key file the
// issuer serves HTTPS itself (TLS 1.2 at least, HSTS on its answers), and
// picks up new files without a restart; files that do not load leave the
// last good certificate in service.
func TestServesTLSAndReloadsCertificate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	certFile, keyFile := writeSelfSigned(t, dir, 1)
	e := syncEnv(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	addr := ln.Addr().String()
	cfg := config(testenv.Topology(), issuer.ModeSync)
	cfg.TLSCertFile, cfg.TLSKeyFile, cfg.RequireTLS, cfg.AdminToken = certFile, keyFile, true, testAdminToken
	cfg.IssuerURL = "https://" + addr
	logs := &lockedBuffer{}
	srv := issuer.New(cfg, clients.NewRegistry(e.pool, time.Minute), nil, nil, e.pool,
		slog.New(slog.NewTextHandler(logs, nil)), issuer.NewMetrics(prometheus.NewRegistry()))
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeListener(ctx, ln, 5*time.Second) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		if t.Failed() {
			t.Logf("TLS issuer log:\n%s", logs.String())
		}
	})

	pem1, err := os.ReadFile(certFile)
	testenv.Must(t, err, "read cert")
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem1)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	resp, err := client.Get("https://" + addr + "/admin/clients/app/tokens?limit=1")
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode != 401 {
		t.Fatalf("HTTPS request: %v", err)
	}
	r, _ := http.NewRequest(http.MethodGet, "https://"+addr+"/admin/clients/app/tokens", nil)
	adminBearer("Bearer")(r)
	resp, err = client.Do(r)
	testenv.Must(t, err, "HTTPS admin request")
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Strict-Transport-Security") == "" {
		t.Fatalf("HTTPS admin request under RequireTLS: %d HSTS=%q", resp.StatusCode, resp.Header.Get("Strict-Transport-Security"))
	}
	old := &tls.Config{InsecureSkipVerify: true, MaxVersion: tls.VersionTLS11} // the handshake is what fails
	if conn, err := tls.Dial("tcp", addr, old); err == nil {
		conn.Close()
		t.Fatal("TLS 1.1 handshake accepted")
	}

	waitSerial := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err := servedSerial(addr)
			if err == nil && got == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("served certificate serial %d (%v), want %d", got, err, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitSerial(1)
	writeSelfSigned(t, dir, 2)
	waitSerial(2)

	// A broken certificate file: the server keeps the last good pair.
	testenv.Must(t, os.WriteFile(certFile, []byte("not a certificate"), 0o600), "break cert")
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "reload failed") {
		if time.Now().After(deadline) {
			t.Fatal("no reload failure logged")
		}
		if got, err := servedSerial(addr); err != nil || got != 2 {
			t.Fatalf("after a bad reload: serial %d, %v", got, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got, err := servedSerial(addr); err != nil || got != 2 {
		t.Fatalf("after a bad reload: serial %d, %v", got, err)
	}
}
