package client_test

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestTokenGoesOnlyToListedHosts: with Hosts set, a request elsewhere, and a
// redirect from a listed host to another, carry no token.
func TestTokenGoesOnlyToListedHosts(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	var mu sync.Mutex
	seen := map[string]string{}
	other := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen["other"+r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
	})
	api := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen["api"+r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		if r.URL.Path == "/redirect" {
			http.Redirect(w, r, other.URL+"/redirected", http.StatusFound)
		}
	})
	tr := client.New(client.Config{Grant: client.ClientCredentials(), Hosts: []string{api.Listener.Addr().String()},
		OAuth2: oauth2.Config{ClientID: "app", ClientSecret: "s", Endpoint: oauth2.Endpoint{TokenURL: iss.srv.URL}}})
	t.Cleanup(tr.Close)
	for _, u := range []string{api.URL + "/direct", other.URL + "/direct", api.URL + "/redirect"} {
		resp, err := tr.Client().Get(u)
		testenv.Must(t, err, "get")
		_ = resp.Body.Close()
	}
	want := map[string]string{"api/direct": "Bearer tok-1", "other/direct": "", "api/redirect": "Bearer tok-1", "other/redirected": ""}
	mu.Lock()
	defer mu.Unlock()
	for k, v := range want {
		if got, ok := seen[k]; !ok || got != v {
			t.Fatalf("%s: Authorization %q (seen %v), want %q", k, got, ok, v)
		}
	}
}

// TestRedirectElsewhereCarriesNoToken: without Hosts, a redirect to another
// host carries no token (and its rotation header is not followed), as
// net/http drops Authorization on such a redirect; a redirect on the same
// host keeps it.
func TestRedirectElsewhereCarriesNoToken(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	var mu sync.Mutex
	seen := map[string]string{}
	other := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen["other"+r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		w.Header().Set(client.HeaderNextToken, "planted")
	})
	api := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen["api"+r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		switch r.URL.Path {
		case "/away":
			http.Redirect(w, r, other.URL+"/redirected", http.StatusFound)
		case "/here":
			http.Redirect(w, r, "/landed", http.StatusFound)
		}
	})
	tr := client.New(client.Config{Grant: client.ClientCredentials(),
		OAuth2: oauth2.Config{ClientID: "app", ClientSecret: "s", Endpoint: oauth2.Endpoint{TokenURL: iss.srv.URL}}})
	t.Cleanup(tr.Close)
	for _, u := range []string{api.URL + "/away", api.URL + "/here", api.URL + "/after"} {
		resp, err := tr.Client().Get(u)
		testenv.Must(t, err, "get")
		_ = resp.Body.Close()
	}
	want := map[string]string{"api/away": "Bearer tok-1", "other/redirected": "",
		"api/here": "Bearer tok-1", "api/landed": "Bearer tok-1", "api/after": "Bearer tok-1"}
	mu.Lock()
	defer mu.Unlock()
	for k, v := range want {
		if got, ok := seen[k]; !ok || got != v {
			t.Fatalf("%s: Authorization %q (seen %v), want %q", k, got, ok, v)
		}
	}
}

// recordingTransport records the Authorization header of every request it
// carries, by URL.
type recordingTransport struct {
	base http.RoundTripper
	mu   sync.Mutex
	seen map[string]string
}

func (r *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r.mu.Lock()
	r.seen[req.URL.String()] = req.Header.Get("Authorization")
	r.mu.Unlock()
	return r.base.RoundTrip(req)
}

// TestRedirectToPlainHTTPCarriesNoToken: a redirect from https to plain
// http on the same host does not send the token in the clear.
func TestRedirectToPlainHTTPCarriesNoToken(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	api := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+r.Host+"/plain", http.StatusFound)
	}))
	t.Cleanup(api.Close)
	rec := &recordingTransport{base: api.Client().Transport, seen: map[string]string{}}
	tr := client.New(client.Config{Grant: client.ClientCredentials(), Base: rec,
		OAuth2: oauth2.Config{ClientID: "app", ClientSecret: "s", Endpoint: oauth2.Endpoint{TokenURL: iss.srv.URL}}})
	t.Cleanup(tr.Close)
	if resp, err := tr.Client().Get(api.URL + "/start"); err == nil {
		_ = resp.Body.Close()
	}
	plain := "http://" + api.Listener.Addr().String() + "/plain"
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if got := rec.seen[api.URL+"/start"]; got != "Bearer tok-1" {
		t.Fatalf("the https request carried %q, want the token", got)
	}
	if got, ok := rec.seen[plain]; !ok || got != "" {
		t.Fatalf("the redirect to plain http carried %q (sent %v), want no token", got, ok)
	}
}
