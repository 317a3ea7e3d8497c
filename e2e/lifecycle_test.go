package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestLifecycleAcrossIssuerProcesses runs the OAuth lifecycle through two
// issuer processes, which share nothing but Postgres, JetStream and their
// configuration: concurrent refreshes through both get one pair; a
// revocation at one reaches the other's introspection cache at once (its TTL
// is an hour here); and `tokenpipe tokens revoke` ends the user's grant.
func TestLifecycleAcrossIssuerProcesses(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, _, topo := testenv.JetStream(t)
	ctx := ctxT(t, 2*time.Minute)
	secret, err := clients.Add(ctx, pool, "life-app", []string{"read"}, []string{"password", "refresh_token"})
	testenv.Must(t, err, "add client")
	testenv.Must(t, clients.AddUser(ctx, pool, "alice", "alice-pw", 4), "add user")
	apiSecret, err := clients.AddWith(ctx, pool, "life-api", nil, nil, clients.Options{Introspect: true})
	testenv.Must(t, err, "add resource server")
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_INTROSPECT_CACHE_TTL=1h", "TOKENPIPE_REFRESH_GRACE=3s")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	_, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	base1, base2 := strings.TrimSuffix(url1, "/oauth2/token"), strings.TrimSuffix(url2, "/oauth2/token")

	// The application uses the token endpoints; the resource server
	// life-api introspects.
	call := func(base, path string, form url.Values) (int, map[string]any, error) {
		req, _ := http.NewRequest(http.MethodPost, base+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if path == "/oauth2/introspect" {
			req.SetBasicAuth("life-api", apiSecret)
		} else {
			req.SetBasicAuth("life-app", secret)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		body := map[string]any{}
		if len(raw) > 0 {
			if err := json.Unmarshal(raw, &body); err != nil {
				return resp.StatusCode, nil, fmt.Errorf("decode %q: %w", raw, err)
			}
		}
		return resp.StatusCode, body, nil
	}
	must := func(base, path string, form url.Values, want int) map[string]any {
		t.Helper()
		status, body, err := call(base, path, form)
		if err != nil || status != want {
			t.Fatalf("%s %s = %d %v %v, want %d", base, path, status, body, err, want)
		}
		return body
	}
	pair := must(base1, "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"alice-pw"}}, 200)
	refresh := pair["refresh_token"].(string)

	answers := make([]map[string]any, 10)
	var wg sync.WaitGroup
	for i := range answers {
		base := []string{base1, base2}[i%2]
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, body, err := call(base, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}})
			if err != nil || status != 200 {
				t.Errorf("refresh %d via %s = %d %v %v", i, base, status, body, err)
			}
			answers[i] = body
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for i, a := range answers {
		if a["access_token"] != answers[0]["access_token"] || a["refresh_token"] != answers[0]["refresh_token"] {
			t.Fatalf("refresh %d got another pair than refresh 0", i)
		}
	}
	access := answers[0]["access_token"].(string)
	newRefresh := answers[0]["refresh_token"].(string)

	digest := events.DigestOf(access)
	testenv.Eventually(t, 30*time.Second, "rotated token persisted ACTIVE", func() (bool, error) {
		var state string
		err := pool.QueryRow(ctx, `SELECT state FROM tokens WHERE token_digest = $1`, digest[:]).Scan(&state)
		return err == nil && state == "ACTIVE", nil
	})
	if a := must(base2, "/oauth2/introspect", url.Values{"token": {access}}, 200); a["active"] != true {
		t.Fatalf("issuer-2 introspects the rotated token as %v", a)
	}
	// issuer-2 now caches the positive answer for an hour; a revocation at
	// issuer-1 must end it.
	must(base1, "/oauth2/revoke", url.Values{"token": {access}}, 200)
	testenv.Eventually(t, 10*time.Second, "issuer-2 sees the revocation", func() (bool, error) {
		status, a, err := call(base2, "/oauth2/introspect", url.Values{"token": {access}})
		return err == nil && status == 200 && a["active"] == false, err
	})
	// Revoking the access token alone leaves the refresh token working
	// (RFC 7009 2.1 lets it); removing the grant does not.
	cli := exec.Command(binary, "tokens", "revoke", "-client", "life-app", "-user", "alice")
	cli.Env = d.env
	out, err := cli.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "revoked the tokens of client life-app for user alice") {
		t.Fatalf("tokenpipe tokens revoke: %v\n%s", err, out)
	}
	if a := must(base2, "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {newRefresh}}, 400); a["error"] != "invalid_grant" {
		t.Fatalf("refresh after the grant was revoked = %v", a)
	}
	var active int
	testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE client_id = 'life-app' AND state = 'ACTIVE'`).Scan(&active), "count")
	if active != 0 {
		t.Fatalf("%d ACTIVE tokens of alice's grant after its revocation", active)
	}
}
