package issuer_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/client"
	"github.com/zitadel/oidc/v3/pkg/client/rp"
	"github.com/zitadel/oidc/v3/pkg/client/rs"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/issuer"
)

// stockGrace is the refresh grace window of the stock client test: short, so
// the test can wait past it.
const stockGrace = 200 * time.Millisecond

// newStockEnv is newEnv in async mode with a short refresh grace window.
func newStockEnv(t *testing.T) *env {
	t.Helper()
	_, pool := testenv.Database(t)
	nc, _, topo := testenv.JetStream(t)
	cfg := config(topo, issuer.ModeAsync)
	cfg.RefreshGrace = stockGrace
	js, err := issuer.NewJetStream(nc, cfg)
	testenv.Must(t, err, "jetstream")
	return startEnv(t, pool, nc, js, topo, cfg)
}

// TestStockClientLibraries drives the endpoints with unmodified client
// libraries: golang.org/x/oauth2 for the token endpoint (client_credentials,
// password, refresh with rotation) and zitadel/oidc for RFC 8414 discovery,
// RFC 7662 introspection and RFC 7009 revocation.
func TestStockClientLibraries(t *testing.T) {
	t.Parallel()
	e := newStockEnv(t)
	// Both libraries take their HTTP client from here: x/oauth2 through the
	// context, zitadel/oidc through its options.
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, e.srv.Client())

	// RFC 8414 discovery, through the library's own discovery call pointed
	// at the OAuth (not OpenID) well-known document.
	wellKnown := e.srv.URL + "/.well-known/oauth-authorization-server"
	meta, err := client.Discover(ctx, e.srv.URL, e.srv.Client(), wellKnown)
	testenv.Must(t, err, "discover")
	for name, got := range map[string]string{
		"token_endpoint":         meta.TokenEndpoint,
		"introspection_endpoint": meta.IntrospectionEndpoint,
		"revocation_endpoint":    meta.RevocationEndpoint,
	} {
		if got == "" {
			t.Fatalf("metadata has no %s: %+v", name, meta)
		}
	}

	// The resource server is another registered client with the introspect
	// permission; the relying party owns the tokens and revokes them.
	resource, err := rs.NewResourceServerClientCredentials(ctx, e.srv.URL, "api", e.api,
		rs.WithClient(e.srv.Client()), rs.WithStaticEndpoints(meta.TokenEndpoint, meta.IntrospectionEndpoint))
	testenv.Must(t, err, "resource server")
	relying, err := rp.NewRelyingPartyOIDC(ctx, e.srv.URL, "app", e.secret, "", nil,
		rp.WithCustomDiscoveryUrl(wellKnown), rp.WithHTTPClient(e.srv.Client()))
	testenv.Must(t, err, "relying party")
	if got := relying.GetRevokeEndpoint(); got != meta.RevocationEndpoint {
		t.Fatalf("relying party revocation endpoint %q, want %q", got, meta.RevocationEndpoint)
	}

	introspect := func(t *testing.T, token string) *oidc.IntrospectionResponse {
		t.Helper()
		ans, err := rs.Introspect[*oidc.IntrospectionResponse](ctx, resource, token)
		testenv.Must(t, err, "introspect")
		return ans
	}
	// A refresh token introspects as active only to its own client (RFC
	// 6749 10.4): the client app asks about its own refresh tokens.
	own, err := rs.NewResourceServerClientCredentials(ctx, e.srv.URL, "app", e.secret,
		rs.WithClient(e.srv.Client()), rs.WithStaticEndpoints(meta.TokenEndpoint, meta.IntrospectionEndpoint))
	testenv.Must(t, err, "the client as its own introspector")
	introspectRefresh := func(t *testing.T, token string) *oidc.IntrospectionResponse {
		t.Helper()
		ans, err := rs.Introspect[*oidc.IntrospectionResponse](ctx, own, token)
		testenv.Must(t, err, "introspect refresh token")
		if ans.Active && ans.TokenType != "refresh_token" {
			t.Fatalf("active refresh token introspects with token_type %q", ans.TokenType)
		}
		if resAns := introspect(t, token); resAns.Active {
			t.Fatalf("a resource server sees a refresh token as active: %+v", resAns)
		}
		return ans
	}
	passwordConfig := func(style oauth2.AuthStyle) *oauth2.Config {
		return &oauth2.Config{ClientID: "app", ClientSecret: e.secret, Scopes: []string{"read", "write"},
			Endpoint: oauth2.Endpoint{TokenURL: meta.TokenEndpoint, AuthStyle: style}}
	}
	// refreshWith redeems refreshToken through the library's TokenSource,
	// which refreshes because the access token it is given has expired.
	refreshWith := func(cfg *oauth2.Config, refreshToken string) (*oauth2.Token, error) {
		expired := &oauth2.Token{AccessToken: "expired", TokenType: "Bearer", RefreshToken: refreshToken,
			Expiry: time.Now().Add(-time.Hour)}
		return cfg.TokenSource(ctx, expired).Token()
	}

	t.Run("client_credentials", func(t *testing.T) {
		styles := map[string]oauth2.AuthStyle{
			"auto": oauth2.AuthStyleAutoDetect, "basic": oauth2.AuthStyleInHeader, "post": oauth2.AuthStyleInParams,
		}
		for name, style := range styles {
			for id, secret := range map[string]string{"app": e.secret, "svc+1%": e.plus} {
				cc := clientcredentials.Config{ClientID: id, ClientSecret: secret, TokenURL: meta.TokenEndpoint,
					Scopes: []string{"read"}, AuthStyle: style}
				tok, err := cc.Token(ctx)
				if err != nil {
					t.Fatalf("%s, client %q: %v", name, id, err)
				}
				if tok.AccessToken == "" || tok.RefreshToken != "" || !tok.Valid() || tok.Type() != "Bearer" {
					t.Fatalf("%s, client %q: token %+v", name, id, tok)
				}
				if got := tok.Extra("scope"); got != "read" {
					t.Fatalf("%s, client %q: scope %v", name, id, got)
				}
				ans := introspect(t, tok.AccessToken)
				if !ans.Active || ans.ClientID != id || ans.Subject != id {
					t.Fatalf("%s, client %q: introspection %+v", name, id, ans)
				}
			}
		}
		// The library's TokenSource for this grant fetches and caches.
		cc := clientcredentials.Config{ClientID: "app", ClientSecret: e.secret, TokenURL: meta.TokenEndpoint}
		ts := cc.TokenSource(ctx)
		first, err := ts.Token()
		testenv.Must(t, err, "token source")
		again, err := ts.Token()
		testenv.Must(t, err, "token source again")
		if first.AccessToken != again.AccessToken {
			t.Fatal("TokenSource did not reuse its valid token")
		}
		if got := first.Extra("scope"); got != "admin read write" {
			t.Fatalf("default scope %v, want the client's full set", got)
		}

		// A wrong secret is an RFC 6749 5.2 error the library understands.
		bad := clientcredentials.Config{ClientID: "app", ClientSecret: "wrong", TokenURL: meta.TokenEndpoint,
			AuthStyle: oauth2.AuthStyleInHeader}
		_, err = bad.Token(ctx)
		checkRetrieveError(t, err, "invalid_client")
		_, err = (&clientcredentials.Config{ClientID: "app", ClientSecret: e.secret, TokenURL: meta.TokenEndpoint,
			Scopes: []string{"root"}}).Token(ctx)
		checkRetrieveError(t, err, "invalid_scope")
	})

	t.Run("password_and_refresh_rotation", func(t *testing.T) {
		cfg := passwordConfig(oauth2.AuthStyleInHeader)
		tok, err := cfg.PasswordCredentialsToken(ctx, "alice", userPassword)
		testenv.Must(t, err, "password grant")
		if tok.AccessToken == "" || tok.RefreshToken == "" || !tok.Valid() || tok.Type() != "Bearer" {
			t.Fatalf("password token %+v", tok)
		}
		if got := tok.Extra("scope"); got != "read write" {
			t.Fatalf("password token scope %v", got)
		}
		_, err = cfg.PasswordCredentialsToken(ctx, "alice", "wrong")
		checkRetrieveError(t, err, "invalid_grant")

		// Force a refresh: the library's TokenSource sees an expired token.
		tok.Expiry = time.Now().Add(-time.Minute)
		refreshed, err := cfg.TokenSource(ctx, tok).Token()
		testenv.Must(t, err, "refresh")
		if refreshed.AccessToken == "" || refreshed.AccessToken == tok.AccessToken {
			t.Fatal("refresh did not return a new access token")
		}
		if refreshed.RefreshToken == "" || refreshed.RefreshToken == tok.RefreshToken {
			t.Fatal("refresh did not rotate the refresh token")
		}
		if !refreshed.Valid() {
			t.Fatalf("refreshed token is not valid: %+v", refreshed)
		}
		ans := introspect(t, refreshed.AccessToken)
		if !ans.Active || ans.ClientID != "app" || ans.Subject != "alice" || ans.Username != "alice" ||
			!slices.Equal(ans.Scope, oidc.SpaceDelimitedArray{"read", "write"}) {
			t.Fatalf("refreshed access token introspection %+v", ans)
		}

		// Past the grace window the old refresh token is reuse: refused,
		// and (OAuth 2.0 security BCP) its whole family with it.
		time.Sleep(stockGrace + 300*time.Millisecond)
		_, err = refreshWith(cfg, tok.RefreshToken)
		checkRetrieveError(t, err, "invalid_grant")
		_, err = refreshWith(cfg, refreshed.RefreshToken)
		checkRetrieveError(t, err, "invalid_grant")
		if ans := introspect(t, refreshed.AccessToken); ans.Active {
			t.Fatalf("access token of a reused family still active: %+v", ans)
		}
	})

	t.Run("introspect_and_revoke_access_token", func(t *testing.T) {
		cfg := passwordConfig(oauth2.AuthStyleInParams)
		tok, err := cfg.PasswordCredentialsToken(ctx, "alice", userPassword)
		testenv.Must(t, err, "password grant")
		ans := introspect(t, tok.AccessToken)
		if !ans.Active || ans.ClientID != "app" || ans.Subject != "alice" || ans.Username != "alice" ||
			ans.TokenType != "Bearer" || !slices.Equal(ans.Scope, oidc.SpaceDelimitedArray{"read", "write"}) {
			t.Fatalf("fresh access token introspection %+v", ans)
		}
		if exp := ans.Expiration.AsTime(); exp.IsZero() || !exp.After(ans.IssuedAt.AsTime()) {
			t.Fatalf("introspection exp %v, iat %v", exp, ans.IssuedAt.AsTime())
		}

		testenv.Must(t, rp.RevokeToken(ctx, relying, tok.AccessToken, "access_token"), "revoke access token")
		if ans := introspect(t, tok.AccessToken); ans.Active || ans.ClientID != "" || ans.Subject != "" {
			t.Fatalf("revoked access token introspection %+v", ans)
		}
		// RFC 7009 2.2: revoking again, or revoking garbage, still succeeds.
		testenv.Must(t, rp.RevokeToken(ctx, relying, tok.AccessToken, "access_token"), "revoke again")
		testenv.Must(t, rp.RevokeToken(ctx, relying, "not-a-token", ""), "revoke garbage")

		// Revoking an access token leaves its refresh token usable.
		refreshed, err := refreshWith(cfg, tok.RefreshToken)
		testenv.Must(t, err, "refresh after access token revocation")
		if !introspect(t, refreshed.AccessToken).Active {
			t.Fatal("token refreshed after access token revocation is not active")
		}
	})

	t.Run("revoke_refresh_token", func(t *testing.T) {
		cfg := passwordConfig(oauth2.AuthStyleAutoDetect)
		tok, err := cfg.PasswordCredentialsToken(ctx, "alice", userPassword)
		testenv.Must(t, err, "password grant")
		if ans := introspectRefresh(t, tok.RefreshToken); !ans.Active || ans.ClientID != "app" || ans.Subject != "alice" {
			t.Fatalf("fresh refresh token introspection %+v", ans)
		}

		testenv.Must(t, rp.RevokeToken(ctx, relying, tok.RefreshToken, "refresh_token"), "revoke refresh token")
		_, err = refreshWith(cfg, tok.RefreshToken)
		checkRetrieveError(t, err, "invalid_grant")
		// RFC 7009 2.1: the access tokens of the same grant go with it.
		for what, text := range map[string]string{"refresh": tok.RefreshToken, "access": tok.AccessToken} {
			if ans := introspect(t, text); ans.Active {
				t.Fatalf("%s token active after its refresh token was revoked: %+v", what, ans)
			}
		}
	})

	t.Run("revoke_with_basic_auth", func(t *testing.T) {
		// zitadel/oidc's RevokeToken in header style sends HTTP Basic
		// credentials and an empty client_id parameter, which RFC 6749 3.2
		// says counts as omitted.
		basicRP, err := rp.NewRelyingPartyOIDC(ctx, e.srv.URL, "app", e.secret, "", nil,
			rp.WithCustomDiscoveryUrl(wellKnown), rp.WithHTTPClient(e.srv.Client()),
			rp.WithAuthStyle(oauth2.AuthStyleInHeader))
		testenv.Must(t, err, "relying party with Basic credentials")
		tok, err := passwordConfig(oauth2.AuthStyleInHeader).PasswordCredentialsToken(ctx, "alice", userPassword)
		testenv.Must(t, err, "password grant")
		testenv.Must(t, rp.RevokeToken(ctx, basicRP, tok.AccessToken, "access_token"), "revoke with Basic credentials")
		if ans := introspect(t, tok.AccessToken); ans.Active {
			t.Fatalf("revoked access token introspection %+v", ans)
		}
	})

	t.Run("revoke_refresh_token_of_another_client", func(t *testing.T) {
		tok, err := passwordConfig(oauth2.AuthStyleInHeader).PasswordCredentialsToken(ctx, "alice", userPassword)
		testenv.Must(t, err, "password grant")
		other, err := rp.NewRelyingPartyOIDC(ctx, e.srv.URL, "narrow", e.narrow, "", nil,
			rp.WithCustomDiscoveryUrl(wellKnown), rp.WithHTTPClient(e.srv.Client()))
		testenv.Must(t, err, "other relying party")
		if err := rp.RevokeToken(ctx, other, tok.RefreshToken, "refresh_token"); err == nil {
			t.Fatal("a client revoked another client's refresh token")
		}
		if !introspectRefresh(t, tok.RefreshToken).Active {
			t.Fatal("refresh token inactive after another client's failed revocation")
		}
	})
}

// checkRetrieveError asserts that x/oauth2 reports the RFC 6749 5.2 error
// code want.
func checkRetrieveError(t *testing.T, err error, want string) {
	t.Helper()
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		t.Fatalf("want oauth2 error %q, got %v", want, err)
	}
	if re.ErrorCode != want {
		t.Fatalf("want oauth2 error %q, got %q (%s)", want, re.ErrorCode, re.ErrorDescription)
	}
}
