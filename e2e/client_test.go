package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestClientRecoversWhenAnotherDeviceSignsIn runs the seed's case on the real
// binary: two issuer processes, a persister and a recovery process. Device A
// signs alice in through issuer 1, device B through issuer 2; recovery makes
// A's token INACTIVE, the resource server (introspecting at issuer 1, which
// learns of it by recovery's notice) answers 401, and A's next call succeeds
// with exactly one token request, a refresh.
func TestClientRecoversWhenAnotherDeviceSignsIn(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, _, topo := testenv.JetStream(t)
	ctx := ctxT(t, time.Minute)
	secret, err := clients.Add(ctx, pool, "mobile", []string{"profile"}, []string{"password", "refresh_token"})
	testenv.Must(t, err, "add client")
	api, err := clients.AddWith(ctx, pool, "api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "alice's password", 4), "add user")
	d := newDeployment(t, dbURL, topo)
	_, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("persister", "persister")
	d.start("recovery", "recovery")

	introspectURL := strings.TrimSuffix(url1, "/token") + "/introspect"
	active := func(token string) (bool, error) {
		form := url.Values{"token": {token}}
		req, err := http.NewRequest(http.MethodPost, introspectURL, strings.NewReader(form.Encode()))
		if err != nil {
			return false, err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth("api", api)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		var ans struct{ Active bool }
		return ans.Active, json.NewDecoder(resp.Body).Decode(&ans)
	}
	var mu sync.Mutex
	var presented []string
	resource := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		mu.Lock()
		presented = append(presented, token)
		mu.Unlock()
		ok, err := active(token)
		switch {
		case err != nil:
			http.Error(w, err.Error(), http.StatusBadGateway)
		case !ok:
			http.Error(w, "invalid token", http.StatusUnauthorized)
		}
	}))
	t.Cleanup(resource.Close)

	first, firstLog := newE2EDevice(t, url1, secret)
	second, _ := newE2EDevice(t, url2, secret)
	call := func(dev *client.Transport) {
		t.Helper()
		resp, err := dev.Client().Get(resource.URL)
		testenv.Must(t, err, "call")
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("call: %d", resp.StatusCode)
		}
	}
	call(first)
	mu.Lock()
	taken := presented[0]
	mu.Unlock()
	call(second)
	testenv.Eventually(t, 30*time.Second, "the first device's token to become inactive", func() (bool, error) {
		ok, err := active(taken)
		return !ok, err
	})
	call(first)
	if got, want := firstLog.requests(), []string{"password", "refresh_token"}; !slices.Equal(got, want) {
		t.Fatalf("first device's token requests %v, want %v", got, want)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(presented) != 4 || presented[2] != taken || presented[3] == taken {
		t.Fatalf("the resource server saw %d calls; want the old token refused once and a new one", len(presented))
	}
}

// newE2EDevice is alice's application on one device, signing in at tokenURL.
func newE2EDevice(t *testing.T, tokenURL, secret string) (*client.Transport, *grantLog) {
	log := &grantLog{}
	tr := client.New(client.Config{
		OAuth2: oauth2.Config{ClientID: "mobile", ClientSecret: secret, Scopes: []string{"profile"},
			Endpoint: oauth2.Endpoint{TokenURL: tokenURL}},
		Grant:        client.Password("alice", "alice's password"),
		IssuerClient: &http.Client{Transport: log},
	})
	t.Cleanup(tr.Close)
	return tr, log
}

// grantLog records the grant type of each token request.
type grantLog struct {
	mu     sync.Mutex
	grants []string
}

func (l *grantLog) RoundTrip(req *http.Request) (*http.Response, error) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return nil, err
	}
	form, _ := url.ParseQuery(string(body))
	l.mu.Lock()
	l.grants = append(l.grants, form.Get("grant_type"))
	l.mu.Unlock()
	req.Body = io.NopCloser(strings.NewReader(string(body)))
	return http.DefaultTransport.RoundTrip(req)
}

func (l *grantLog) requests() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.grants)
}
