package cli

import (
	"github.com/tokenpipe/tokenpipe/internal/app"

	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/internal/clients"
)

// lifecycleDemo walks one user through the OAuth lifecycle against the
// running issuer: password grant, introspection by a resource server, ten
// concurrent refreshes, revocation, and the account API. It returns the curl
// lines to try by hand.
func lifecycleDemo(ctx context.Context, pool *pgxpool.Pool, base string, say func(string, ...any)) ([]string, error) {
	clientID, user, password := "demo-app-"+app.RandomID(), "demo-user-"+app.RandomID(), app.RandomKey()
	secret, err := clients.Add(ctx, pool, clientID, []string{"profile", "email"}, []string{"password", "refresh_token"})
	if err != nil {
		return nil, err
	}
	if err := clients.AddUser(ctx, pool, user, password, 4); err != nil {
		return nil, err
	}
	// A resource server checks tokens and obtains none: no grant, only the
	// permission to introspect every client's tokens.
	apiID := "demo-api-" + app.RandomID()
	apiSecret, err := clients.AddWith(ctx, pool, apiID, nil, nil, clients.Options{Introspect: true})
	if err != nil {
		return nil, err
	}
	otherID := "demo-other-" + app.RandomID()
	otherSecret, err := clients.Add(ctx, pool, otherID, nil, []string{"client_credentials"})
	if err != nil {
		return nil, err
	}
	call := func(method, path string, form url.Values, auth func(*http.Request)) (int, map[string]any, error) {
		req, err := http.NewRequestWithContext(ctx, method, base+path, strings.NewReader(form.Encode()))
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		auth(req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		body := map[string]any{}
		raw, _ := io.ReadAll(resp.Body)
		if len(raw) > 0 {
			if err := json.Unmarshal(raw, &body); err != nil {
				return resp.StatusCode, nil, fmt.Errorf("%s %s: %d %q", method, path, resp.StatusCode, raw)
			}
		}
		return resp.StatusCode, body, nil
	}
	asClient := func(r *http.Request) { r.SetBasicAuth(clientID, secret) }
	asAPI := func(r *http.Request) { r.SetBasicAuth(apiID, apiSecret) }
	asOther := func(r *http.Request) { r.SetBasicAuth(otherID, otherSecret) }
	asUser := func(r *http.Request) { r.SetBasicAuth(user, password) }
	expect := func(what string, status int, body map[string]any, err error, want int) error {
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if status != want {
			return fmt.Errorf("%s: HTTP %d %v, want %d", what, status, body, want)
		}
		return nil
	}

	status, pair, err := call("POST", "/oauth2/token", url.Values{"grant_type": {"password"}, "username": {user}, "password": {password}, "scope": {"profile"}}, asClient)
	if err := expect("password grant", status, pair, err, 200); err != nil {
		return nil, err
	}
	access, _ := pair["access_token"].(string)
	refresh, _ := pair["refresh_token"].(string)
	status, intro, err := call("POST", "/oauth2/introspect", url.Values{"token": {access}}, asAPI)
	if err := expect("introspect", status, intro, err, 200); err != nil {
		return nil, err
	}
	say("  password grant for %s: access and refresh token; resource server %s introspects it right away: active=%v", user, apiID, intro["active"])
	status, foreign, err := call("POST", "/oauth2/introspect", url.Values{"token": {access}}, asOther)
	if err := expect("introspect by another client", status, foreign, err, 200); err != nil {
		return nil, err
	}
	say("  another client without the introspect permission learns nothing: %v", foreign)
	if intro["active"] != true || len(foreign) != 1 || foreign["active"] != false {
		return nil, fmt.Errorf("introspection permissions did not behave as documented")
	}

	results := make([]map[string]any, 10)
	errs := make([]error, 10)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, body, err := call("POST", "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, asClient)
			errs[i] = expect("refresh", st, body, err, 200)
			results[i] = body
		}()
	}
	wg.Wait()
	pairs := map[string]bool{}
	for i := range results {
		if errs[i] != nil {
			return nil, errs[i]
		}
		pairs[fmt.Sprint(results[i]["access_token"], results[i]["refresh_token"])] = true
	}
	newAccess, _ := results[0]["access_token"].(string)
	newRefresh, _ := results[0]["refresh_token"].(string)
	say("  10 concurrent refreshes with one refresh token: %d distinct new pair(s)", len(pairs))

	// The account lists applications from persisted rows, which trail the
	// answers by about one persister batch: ask until the application shows,
	// as a dashboard reloaded a moment later would, for at most 5 s.
	var list []any
	asked := time.Now()
	for {
		status, apps, err := call("GET", "/account/applications", nil, asUser)
		if err := expect("account applications", status, apps, err, 200); err != nil {
			return nil, err
		}
		list, _ = apps["applications"].([]any)
		if len(list) > 0 || time.Since(asked) > 5*time.Second {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	say("  %s's account lists %d application(s) with live tokens (%v after the refreshes, once persisted)",
		user, len(list), time.Since(asked).Round(time.Millisecond))

	status, body, err := call("POST", "/oauth2/revoke", url.Values{"token": {newRefresh}, "token_type_hint": {"refresh_token"}}, asClient)
	if err := expect("revoke", status, body, err, 200); err != nil {
		return nil, err
	}
	_, intro, err = call("POST", "/oauth2/introspect", url.Values{"token": {newAccess}}, asAPI)
	if err != nil {
		return nil, err
	}
	status, body, err = call("POST", "/oauth2/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {newRefresh}}, asClient)
	if err != nil {
		return nil, err
	}
	say("  after revoking the refresh token: its access token active=%v; refreshing answers %d %v", intro["active"], status, body["error"])
	if len(pairs) != 1 || intro["active"] != false || status != 400 {
		return nil, fmt.Errorf("the lifecycle walk-through did not behave as documented")
	}
	return []string{
		fmt.Sprintf("curl -s -u '%s:%s' -d grant_type=password -d username=%s -d password='%s' -d scope=profile %s/oauth2/token", clientID, secret, user, password, base),
		fmt.Sprintf("curl -s -u '%s:%s' -d grant_type=refresh_token -d refresh_token=RT %s/oauth2/token", clientID, secret, base),
		fmt.Sprintf("curl -s -u '%s:%s' -d token=AT %s/oauth2/introspect", apiID, apiSecret, base),
		fmt.Sprintf("curl -s -u '%s:%s' -d token=RT %s/oauth2/revoke", clientID, secret, base),
		fmt.Sprintf("curl -s -u '%s:%s' %s/account/applications", user, password, base),
		fmt.Sprintf("curl -s -u '%s:%s' -X DELETE %s/account/applications/%s", user, password, base, clientID),
		fmt.Sprintf("curl -s %s/.well-known/oauth-authorization-server", base),
	}, nil
}
