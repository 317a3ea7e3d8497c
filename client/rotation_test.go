package client_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// The rotation tests check only the client's bookkeeping of the
// Tokenpipe-Next-Token header, against a fake token endpoint and a fake
// resource server; the middleware's own tests run the real exchange.

func httptestServer(t *testing.T, h http.HandlerFunc) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// fakeIssuer answers every token request with tok-1, tok-2, ... valid for an
// hour.
type fakeIssuer struct {
	srv *httptest.Server
	n   atomic.Int64
}

func newFakeIssuer(t *testing.T) *fakeIssuer {
	f := &fakeIssuer{}
	f.srv = httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"access_token": fmt.Sprintf("tok-%d", f.n.Add(1)), "token_type": "Bearer", "expires_in": 3600})
	})
	return f
}

func (f *fakeIssuer) transport(t *testing.T) *client.Transport {
	tr := client.New(client.Config{Grant: client.ClientCredentials(),
		OAuth2: oauth2.Config{ClientID: "app", ClientSecret: "s", Endpoint: oauth2.Endpoint{TokenURL: f.srv.URL}}})
	t.Cleanup(tr.Close)
	return tr
}

// rotatingServer answers each request with a successor named after the
// request's path (rot-<path>), unless the path starts with /same; its gates,
// keyed by path, hold an answer until closed.
type rotatingServer struct {
	srv      *httptest.Server
	lifetime string
	gates    map[string]chan struct{}

	mu        sync.Mutex
	presented map[string]string // path -> bearer token presented
	arrived   map[string]chan struct{}
}

func newRotatingServer(t *testing.T, lifetime string, gated ...string) *rotatingServer {
	rs := &rotatingServer{lifetime: lifetime, gates: map[string]chan struct{}{},
		presented: map[string]string{}, arrived: map[string]chan struct{}{}}
	for _, p := range gated {
		rs.gates[p] = make(chan struct{})
		rs.arrived[p] = make(chan struct{})
	}
	rs.srv = httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		rs.mu.Lock()
		rs.presented[r.URL.Path] = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		rs.mu.Unlock()
		if gate, ok := rs.gates[r.URL.Path]; ok {
			close(rs.arrived[r.URL.Path])
			<-gate
		}
		if !strings.HasPrefix(r.URL.Path, "/same") {
			w.Header().Set(client.HeaderNextToken, "rot"+strings.ReplaceAll(r.URL.Path, "/", "-"))
			if rs.lifetime != "" {
				w.Header().Set(client.HeaderNextTokenExpiresIn, rs.lifetime)
			}
		}
		_, _ = w.Write([]byte("ok"))
	})
	return rs
}

func (rs *rotatingServer) tokenAt(path string) string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.presented[path]
}

func get(t *testing.T, c *http.Client, url string) *http.Response {
	t.Helper()
	resp, err := c.Get(url)
	testenv.Must(t, err, "get")
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d", url, resp.StatusCode)
	}
	return resp
}

// TestRotationHeaderReplacesTheToken: each answer's successor is presented by
// the next request, and the application never sees the headers.
func TestRotationHeaderReplacesTheToken(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	rs := newRotatingServer(t, "3600")
	c := iss.transport(t).Client()
	for _, p := range []string{"/a", "/b", "/same", "/c"} {
		resp := get(t, c, rs.srv.URL+p)
		if resp.Header.Get(client.HeaderNextToken) != "" || resp.Header.Get(client.HeaderNextTokenExpiresIn) != "" {
			t.Fatalf("%s: the application sees the rotation headers", p)
		}
	}
	want := map[string]string{"/a": "tok-1", "/b": "rot-a", "/same": "rot-b", "/c": "rot-b"}
	for p, tok := range want {
		if got := rs.tokenAt(p); got != tok {
			t.Fatalf("%s presented %q, want %q", p, got, tok)
		}
	}
	if n := iss.n.Load(); n != 1 {
		t.Fatalf("%d token requests, want 1: rotation needs none", n)
	}
}

// TestOlderAnswerNeverReplacesNewerToken: /slow presents tok-1 and its answer
// is held while /b (also tok-1) rotates to rot-b and /c (rot-b) to rot-c.
// /slow's answer then carries a successor of tok-1, which is no longer
// current: it is ignored, and /d presents rot-c.
func TestOlderAnswerNeverReplacesNewerToken(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	rs := newRotatingServer(t, "3600", "/slow")
	c := iss.transport(t).Client()
	get(t, c, rs.srv.URL+"/same") // the first token, tok-1
	slow := make(chan error, 1)
	go func() {
		resp, err := c.Get(rs.srv.URL + "/slow")
		if err == nil {
			err = resp.Body.Close()
		}
		slow <- err
	}()
	<-rs.arrived["/slow"]
	get(t, c, rs.srv.URL+"/b")
	get(t, c, rs.srv.URL+"/c")
	close(rs.gates["/slow"])
	testenv.Must(t, <-slow, "slow request")
	get(t, c, rs.srv.URL+"/d")
	want := map[string]string{"/slow": "tok-1", "/b": "tok-1", "/c": "rot-b", "/d": "rot-c"}
	for p, tok := range want {
		if got := rs.tokenAt(p); got != tok {
			t.Fatalf("%s presented %q, want %q", p, got, tok)
		}
	}
}

// TestParallelRequestsNeedNoCoordination: requests sent at once all present
// the current token; whichever answer comes first rotates it, the others'
// successors of the same token then being ignored, and later requests
// present one of the successors, never the old token.
func TestParallelRequestsNeedNoCoordination(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	rs := newRotatingServer(t, "3600")
	c := iss.transport(t).Client()
	get(t, c, rs.srv.URL+"/same")
	paths := []string{"/p0", "/p1", "/p2", "/p3", "/p4", "/p5", "/p6", "/p7"}
	var wg sync.WaitGroup
	for _, p := range paths {
		wg.Go(func() {
			resp, err := c.Get(rs.srv.URL + p)
			if err != nil {
				t.Error(err)
				return
			}
			_ = resp.Body.Close()
		})
	}
	wg.Wait()
	get(t, c, rs.srv.URL+"/same-after")
	var successors []string
	for _, p := range paths {
		if got := rs.tokenAt(p); got != "tok-1" && !strings.HasPrefix(got, "rot-p") {
			t.Fatalf("%s presented %q", p, got)
		}
		successors = append(successors, "rot"+strings.ReplaceAll(p, "/", "-"))
	}
	if got := rs.tokenAt("/same-after"); !slices.Contains(successors, got) {
		t.Fatalf("after the parallel requests: %q, want one of their successors", got)
	}
	if n := iss.n.Load(); n != 1 {
		t.Fatalf("%d token requests, want 1", n)
	}
}

// TestSuccessorLifetime: a successor's lifetime is its Expires-In; one
// already at its end is replaced by a token request, while one without a
// lifetime is kept until a 401 says otherwise.
func TestSuccessorLifetime(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		lifetime string
		want     string // presented by the request after the rotation
	}{
		{lifetime: "1", want: "tok-2"}, // within x/oauth2's 10 s expiry margin: expired
		{lifetime: "", want: "rot-a"},
		{lifetime: "soon", want: "rot-a"},
		{lifetime: "3600", want: "rot-a"},
	} {
		iss := newFakeIssuer(t)
		rs := newRotatingServer(t, c.lifetime)
		hc := iss.transport(t).Client()
		get(t, hc, rs.srv.URL+"/a")
		get(t, hc, rs.srv.URL+"/same")
		if got := rs.tokenAt("/same"); got != c.want {
			t.Fatalf("Expires-In %q: next request presented %q, want %q", c.lifetime, got, c.want)
		}
	}
}

// TestSuccessorIn401IsIgnored: a successor on a refused answer is not taken;
// the transport obtains a new token and retries with it instead.
func TestSuccessorIn401IsIgnored(t *testing.T) {
	t.Parallel()
	iss := newFakeIssuer(t)
	var mu sync.Mutex
	var presented []string
	srv := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		presented = append(presented, r.Header.Get("Authorization"))
		n := len(presented)
		mu.Unlock()
		if n == 2 {
			w.Header().Set(client.HeaderNextToken, "from-a-401")
			w.WriteHeader(http.StatusUnauthorized)
		}
	})
	hc := iss.transport(t).Client()
	get(t, hc, srv.URL) // obtains tok-1
	get(t, hc, srv.URL) // refused, renewed, retried
	get(t, hc, srv.URL)
	want := []string{"Bearer tok-1", "Bearer tok-1", "Bearer tok-2", "Bearer tok-2"}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(presented, want) {
		t.Fatalf("presented %v, want %v", presented, want)
	}
}
