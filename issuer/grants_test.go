package issuer_test

import (
	"net/http"
	"net/url"
	"testing"
)

// TestAdminTurnsRefreshOff: once an operator withdraws a client's
// refresh_token grant, its refresh tokens are refused with
// unauthorized_client and sign-ins return none; turned on again, the same
// refresh token works (withdrawing the grant revokes nothing).
func TestAdminTurnsRefreshOff(t *testing.T) {
	t.Parallel()
	e, _ := lifecycleEnv(t, nil)
	refresh := e.password(t, e.srv.URL).body["refresh_token"].(string)
	grant := func(method, path string) answer {
		r, _ := http.NewRequest(method, e.srv.URL+path, nil)
		r.Header.Set("Authorization", "Bearer "+adminToken)
		return do(t, r)
	}
	if a := grant(http.MethodDelete, "/admin/clients/app/grants/refresh_token"); a.status != 200 || a.body["allowed"] != false {
		t.Fatalf("refresh off = %d %v", a.status, a.body)
	}
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 400 || a.body["error"] != "unauthorized_client" {
		t.Fatalf("refresh with the grant off = %d %v, want 400 unauthorized_client", a.status, a.body)
	}
	signIn := url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {userPassword}, "scope": {"read"}}
	if a := e.to(t, e.srv.URL, "/oauth2/token", signIn, basic("app", e.secret)); a.status != 200 || a.body["refresh_token"] != nil {
		t.Fatalf("sign-in with the grant off = %d %v, want a token and no refresh token", a.status, a.body)
	}
	if a := grant(http.MethodPut, "/admin/clients/app/grants/refresh_token"); a.status != 200 || a.body["allowed"] != true {
		t.Fatalf("refresh on = %d %v", a.status, a.body)
	}
	if a := e.refreshWith(t, e.srv.URL, refresh); a.status != 200 {
		t.Fatalf("refresh with the grant on again = %d %v", a.status, a.body)
	}
	for path, want := range map[string]int{
		"/admin/clients/app/grants/implicit":         400,
		"/admin/clients/nobody/grants/refresh_token": 404,
		"/admin/clients/a%20b/grants/refresh_token":  400,
	} {
		if a := grant(http.MethodDelete, path); a.status != want {
			t.Errorf("DELETE %s = %d, want %d", path, a.status, want)
		}
	}
	r, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/admin/clients/app/grants/refresh_token", nil)
	if a := do(t, r); a.status != 401 {
		t.Fatalf("without the admin token = %d, want 401", a.status)
	}
}
