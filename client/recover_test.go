package client_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenpipe/tokenpipe/client"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestAnotherDeviceTakesTheToken is the seed's case: one ACTIVE token per
// (client, user, scope), and a second device signs the same user in to the
// same application. The first device's token becomes INACTIVE; its next call
// succeeds without the application noticing, with exactly one token request
// (a refresh). The two sign-ins are never coalesced: a sign-in that returns a
// refresh token gets its own family, which is what a second device is. The
// second device signs in through another issuer instance than the one the
// resource server asks, which had the first device's token cached as active.
func TestAnotherDeviceTakesTheToken(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	first := w.device(t, client.Password(user, password))
	second := w.device(t, client.Password(user, password), func(c *client.Config) {
		c.OAuth2.Endpoint.TokenURL = w.issuer2.URL + "/oauth2/token"
	})

	if status, body := first.get(t, w); status != http.StatusOK || body != "hello "+user {
		t.Fatalf("first device's first call: %d %q", status, body)
	}
	taken := first.issuerLog.lastAccess(t)
	if status, _ := second.get(t, w); status != http.StatusOK {
		t.Fatalf("second device's call: %d", status)
	}
	w.waitInactive(t, taken)

	if status, body := first.get(t, w); status != http.StatusOK || body != "hello "+user {
		t.Fatalf("first device's call after the takeover: %d %q", status, body)
	}
	if got, want := first.issuerLog.requests(), []string{"password", "refresh_token"}; !slices.Equal(got, want) {
		t.Fatalf("first device's token requests %v, want %v", got, want)
	}
	renewed := first.issuerLog.lastAccess(t)
	if got, want := w.resource.presentedTokens(), []string{taken, second.issuerLog.lastAccess(t), taken, renewed}; !slices.Equal(got, want) {
		t.Fatalf("the resource server saw tokens %v, want the first device's old one refused and its new one", got)
	}
	// And now the first device holds the key's token: the second's ended.
	w.waitInactive(t, second.issuerLog.lastAccess(t))
	first.assertNoSecretsLogged(t, w)
}

// TestConcurrent401sShareOneTokenRequest sends 100 requests at once with a
// revoked token. The resource server holds every answer until all 100 have
// arrived, so all 100 get 401 at the same time; one token request serves
// them all, and every request is retried and succeeds.
func TestConcurrent401sShareOneTokenRequest(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	d := w.device(t, client.ClientCredentials())
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("first call: %d", status)
	}
	old := d.issuerLog.lastAccess(t)
	w.revoke(t, old, "access_token")

	const n = 100
	all := make(chan struct{})
	var mu sync.Mutex
	arrived := 0
	w.resource.gate = func(r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+old {
			return
		}
		mu.Lock()
		arrived++
		if arrived == n {
			close(all)
		}
		mu.Unlock()
		select {
		case <-all:
		case <-time.After(30 * time.Second):
		}
	}
	statuses := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			resp, err := d.http.Get(w.resource.srv.URL + "/hello")
			if err != nil {
				t.Error(err)
				statuses <- 0
				return
			}
			_ = resp.Body.Close()
			statuses <- resp.StatusCode
		})
	}
	wg.Wait()
	close(statuses)
	for s := range statuses {
		if s != http.StatusOK {
			t.Fatalf("a request ended with %d, want every one retried to 200", s)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if arrived != n {
		t.Fatalf("%d requests presented the revoked token at once, want %d", arrived, n)
	}
	if got := d.issuerLog.requests(); len(got) != 2 {
		t.Fatalf("token requests %v: want the first and exactly one for %d concurrent 401s", got, n)
	}
	renewed := d.issuerLog.lastAccess(t)
	counts := map[string]int{}
	for _, tok := range w.resource.presentedTokens() {
		counts[tok]++
	}
	if counts[old] != n+1 || counts[renewed] != n || renewed == old {
		t.Fatalf("presented: old token %d times, new %d times; want %d and %d", counts[old], counts[renewed], n+1, n)
	}
	d.assertNoSecretsLogged(t, w)
}

// TestRetryReplaysTheBody: a request whose body can be replayed is retried
// with its whole body; one whose body cannot gets the 401, and the token is
// renewed anyway, so the next request succeeds without another token request.
func TestRetryReplaysTheBody(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	d := w.device(t, client.ClientCredentials())
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("first call: %d", status)
	}
	w.revoke(t, d.issuerLog.lastAccess(t), "access_token")

	const payload = "the request body, sent twice"
	resp, err := d.http.Post(w.resource.srv.URL+"/echo", "text/plain", strings.NewReader(payload))
	testenv.Must(t, err, "post")
	got, err := io.ReadAll(resp.Body)
	testenv.Must(t, err, "read")
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(got) != payload {
		t.Fatalf("replayable post: %d %q, want 200 and the body", resp.StatusCode, got)
	}

	w.revoke(t, d.issuerLog.lastAccess(t), "access_token")
	oneShot := io.NopCloser(strings.NewReader(payload)) // no GetBody: cannot be replayed
	resp, err = d.http.Post(w.resource.srv.URL+"/echo", "text/plain", oneShot)
	testenv.Must(t, err, "post")
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("post whose body cannot be replayed: %d, want the 401", resp.StatusCode)
	}
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("call after the 401: %d", status)
	}
	if got := d.issuerLog.requests(); len(got) != 3 {
		t.Fatalf("token requests %v, want one per revocation", got)
	}
}

// TestRefusedNewTokenDoesNotLoop: a resource server that refuses every token
// costs at most one token request per request, and the application gets the
// 401. A request is retried only with a token other than the refused one:
// client_credentials requests in one coalescing window get the same token.
func TestRefusedNewTokenDoesNotLoop(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	var mu sync.Mutex
	var presented []string
	refuseAll := httptestServer(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		presented = append(presented, r.Header.Get("Authorization"))
		mu.Unlock()
		http.Error(w, "no", http.StatusUnauthorized)
	})
	for _, c := range []struct {
		grant client.Grant
		want  []string
	}{
		// The first call's token was obtained for it: no second one.
		// Each later call renews once.
		{client.Password(user, password), []string{"password", "refresh_token", "refresh_token"}},
		{client.ClientCredentials(), []string{"client_credentials", "client_credentials", "client_credentials"}},
	} {
		mu.Lock()
		presented = nil
		mu.Unlock()
		d := w.device(t, c.grant)
		for i := range 3 {
			resp, err := d.http.Get(refuseAll.URL)
			testenv.Must(t, err, "get")
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("call %d: %d, want 401", i, resp.StatusCode)
			}
		}
		if got := d.issuerLog.requests(); !slices.Equal(got, c.want) {
			t.Fatalf("token requests %v, want %v", got, c.want)
		}
		// One presentation per call, plus one retry per new token.
		distinct := slices.Compact(d.issuerLog.tokens()[:len(c.want)])
		mu.Lock()
		n := len(presented)
		mu.Unlock()
		if want := 3 + len(distinct) - 1; n != want {
			t.Fatalf("%v: %d requests reached the resource server with %d distinct tokens, want %d", c.want[0], n, len(distinct), want)
		}
	}
}

// TestRevokedSignInIsSignInAgain: the user removes the application (its
// refresh token is revoked, and with it the family's access token). The next
// call's refresh is refused with invalid_grant, which the application sees
// as ErrSignInAgain; until it signs in again, calls fail at once without a
// token request; after SignIn they work.
func TestRevokedSignInIsSignInAgain(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	d := w.device(t, client.Password(user, password))
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("first call: %d", status)
	}
	w.revoke(t, d.issuerLog.lastRefresh(t), "refresh_token")

	for i := range 2 {
		_, err := d.http.Get(w.resource.srv.URL + "/hello")
		if !errors.Is(err, client.ErrSignInAgain) {
			t.Fatalf("call %d after revocation: %v, want ErrSignInAgain", i, err)
		}
	}
	if got, want := d.issuerLog.requests(), []string{"password", "refresh_token"}; !slices.Equal(got, want) {
		t.Fatalf("token requests %v, want %v (no request once the sign-in ended)", got, want)
	}
	testenv.Must(t, d.SignIn(context.Background(), client.Password(user, password)), "sign in again")
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("call after signing in again: %d", status)
	}
	var re *oauth2.RetrieveError
	err := d.SignIn(context.Background(), client.Password(user, "wrong"))
	if !errors.Is(err, client.ErrSignInAgain) || !errors.As(err, &re) {
		t.Fatalf("sign-in with a wrong password: %v, want ErrSignInAgain wrapping the issuer's answer", err)
	}
	d.assertNoSecretsLogged(t, w)
}

// TestIssuerUnavailableIsRetried: an issuer that cannot record tokens (its
// stream does not exist yet) answers 503 with Retry-After; the transport
// waits and retries, and the call succeeds once the stream exists.
func TestIssuerUnavailableIsRetried(t *testing.T) {
	t.Parallel()
	w := newWorld(t, true)
	d := w.device(t, client.ClientCredentials())
	var once sync.Once
	d.issuerLog.onAnswer = func(status int) {
		if status == http.StatusServiceUnavailable {
			once.Do(func() { w.provision(t) })
		}
	}
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("call: %d", status)
	}
	if got := d.issuerLog.answers(); !slices.Equal(got, []int{503, 200}) {
		t.Fatalf("token request statuses %v, want one 503 then 200", got)
	}
	d.assertNoSecretsLogged(t, w)
}

// TestIssuerUnavailableWaitIsBounded: an issuer that stays unavailable ends
// the wait once the next retry would pass UnavailableWait, and a Retry-After
// beyond what is left is not waited for at all.
func TestIssuerUnavailableWaitIsBounded(t *testing.T) {
	t.Parallel()
	w := newWorld(t, true)
	for _, c := range []struct {
		wait     time.Duration
		attempts int // at most
	}{
		{wait: 500 * time.Millisecond, attempts: 1}, // Retry-After: 1 is beyond it
		{wait: 1500 * time.Millisecond, attempts: 2},
	} {
		d := w.device(t, client.ClientCredentials(), func(c2 *client.Config) { c2.UnavailableWait = c.wait })
		_, err := d.http.Get(w.resource.srv.URL + "/hello")
		var re *oauth2.RetrieveError
		if !errors.As(err, &re) || re.Response.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("wait %s: %v, want the issuer's 503", c.wait, err)
		}
		if n := len(d.issuerLog.requests()); n < 1 || n > c.attempts {
			t.Fatalf("wait %s: %d token requests, want 1 to %d", c.wait, n, c.attempts)
		}
	}
}

// TestCancelledRequestDoesNotAbandonTheRefresh: a request cancelled while its
// refresh is in flight gives up at once, but the refresh is not cancelled
// with it: it completes and its pair is kept, so the next request needs no
// token request. (A refresh abandoned after the issuer rotated would lose the
// new pair, and the family with it once the grace window passed.)
func TestCancelledRequestDoesNotAbandonTheRefresh(t *testing.T) {
	t.Parallel()
	w := newWorld(t, false)
	d := w.device(t, client.Password(user, password))
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("first call: %d", status)
	}
	w.revoke(t, d.issuerLog.lastAccess(t), "access_token")

	ctx, cancel := context.WithCancel(context.Background())
	returned := make(chan struct{})
	d.issuerLog.onSend = func() {
		cancel() // the application gives up as the refresh leaves
		<-returned
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.resource.srv.URL+"/hello", nil)
	testenv.Must(t, err, "request")
	_, err = d.http.Do(req)
	close(returned)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v, want context.Canceled", err)
	}
	d.Close() // waits for the token request
	d.issuerLog.onSend = nil
	if status, _ := d.get(t, w); status != http.StatusOK {
		t.Fatalf("call after the cancelled one: %d", status)
	}
	if got, want := d.issuerLog.requests(), []string{"password", "refresh_token"}; !slices.Equal(got, want) {
		t.Fatalf("token requests %v, want %v", got, want)
	}
}
