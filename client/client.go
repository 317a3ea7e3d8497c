// Package client is an http.RoundTripper for applications that call resource
// servers protected by tokenpipe. It adds the bearer token to each request and
// keeps the token usable without the application's help:
//
//   - a 401 from the resource server makes it obtain a new token once (the
//     refresh grant while it holds a refresh token, else the grant it was
//     configured with) and retry the request once, when its body can be
//     replayed; concurrent 401s share one token request;
//   - an issuer answering 503 is retried after its Retry-After, with bounded
//     exponential back-off;
//   - a refresh token the issuer refuses (invalid_grant: revoked, expired,
//     reused) ends the sign-in: requests fail with ErrSignInAgain until the
//     application calls SignIn;
//   - a successor token a resource server hands out in the
//     Tokenpipe-Next-Token header (per-request rotation) replaces the current
//     token, when the response answers a request that presented the current
//     token.
//
// Credentials and tokens live in memory only and are never logged.
// golang.org/x/oauth2's token sources make the token requests; they refresh
// a token on expiry but not on a 401, which is what this package adds.
package client

import (
	"errors"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"golang.org/x/oauth2"
)

// ErrSignInAgain means the issuer ended this sign-in (a refresh token or a
// password it refused with invalid_grant), or the application never signed
// in: the application must sign the user in again (SignIn). Test for it with
// errors.Is; http.Client wraps it in a *url.Error.
var ErrSignInAgain = errors.New("client: sign in again")

// Defaults for Config fields left zero.
const (
	DefaultUnavailableWait = 30 * time.Second
	DefaultTokenTimeout    = time.Minute
)

// Grant is how the transport obtains a token when it holds no refresh token.
type Grant struct {
	kind               string
	username, password string
}

const (
	kindClientCredentials = "client_credentials"
	kindPassword          = "password"
)

// ClientCredentials signs in as the client itself (RFC 6749 4.4).
func ClientCredentials() Grant { return Grant{kind: kindClientCredentials} }

// Password signs a user in with the resource owner password grant (RFC 6749
// 4.3; for legacy clients only, see the README). The password is kept in
// memory until the issuer returns a refresh token, which then replaces it.
func Password(username, password string) Grant {
	return Grant{kind: kindPassword, username: username, password: password}
}

// Config configures a Transport.
type Config struct {
	// OAuth2 is the client's registration: ClientID, ClientSecret,
	// Endpoint.TokenURL and Scopes. An AuthStyleAutoDetect endpoint is sent
	// HTTP Basic: tokenpipe accepts it, and detection would send a refused
	// request twice.
	OAuth2 oauth2.Config
	// Grant is how to sign in; the zero Grant means the application signs
	// in later with SignIn.
	Grant Grant
	// Base carries the requests to resource servers; nil means
	// http.DefaultTransport.
	Base http.RoundTripper
	// IssuerClient carries the token requests; nil means http.DefaultClient.
	IssuerClient *http.Client
	// Hosts, when set, are the only URL hosts (host or host:port, as in the
	// request URL) that receive the token; requests to other hosts pass
	// through without one. Without Hosts, any host the application asks
	// receives it, but a redirect to another host than the one first asked
	// never does. A redirect from https to plain http never carries it.
	Hosts []string
	// UnavailableWait bounds the total wait for an issuer that answers 503
	// or cannot be reached, per token request.
	UnavailableWait time.Duration
	// TokenTimeout bounds one token request, retries included. A token
	// request does not end when the request that started it is cancelled:
	// a refresh abandoned after the issuer rotated would lose the new pair.
	TokenTimeout time.Duration
	// Log receives what happened (never a token or a credential); nil
	// discards it.
	Log *slog.Logger
}

// Transport is an http.RoundTripper that authenticates requests with a token
// it keeps fresh. It is safe for concurrent use. Close waits for a token
// request still running.
type Transport struct {
	cfg  Config
	base http.RoundTripper
	log  *slog.Logger

	mu       sync.Mutex
	tok      *oauth2.Token // the current token; nil before sign-in
	grant    Grant         // how to sign in again; zero once a refresh token replaced it
	epoch    uint64        // incremented by SignIn: an older fetch's result is stale
	fetch    *fetchCall    // the token request in flight, shared by every waiter
	fetching sync.WaitGroup
}

// New returns a Transport. It makes no request: the first RoundTrip obtains
// the first token.
func New(cfg Config) *Transport {
	if cfg.UnavailableWait <= 0 {
		cfg.UnavailableWait = DefaultUnavailableWait
	}
	if cfg.TokenTimeout <= 0 {
		cfg.TokenTimeout = DefaultTokenTimeout
	}
	if cfg.IssuerClient == nil {
		cfg.IssuerClient = http.DefaultClient
	}
	if cfg.OAuth2.Endpoint.AuthStyle == oauth2.AuthStyleAutoDetect {
		cfg.OAuth2.Endpoint.AuthStyle = oauth2.AuthStyleInHeader
	}
	t := &Transport{cfg: cfg, base: cfg.Base, log: cfg.Log, grant: cfg.Grant}
	if t.base == nil {
		t.base = http.DefaultTransport
	}
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	return t
}

// Client returns an http.Client that sends its requests through t.
func (t *Transport) Client() *http.Client { return &http.Client{Transport: t} }

// Close waits for a token request in flight to finish.
func (t *Transport) Close() { t.fetching.Wait() }

// RoundTrip sends req with the current token. On a 401 it obtains a new
// token (at most one per request, shared with concurrent requests) and, if
// the body can be replayed, sends req once more; otherwise, or if the retry
// is refused too, the application gets the 401.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !t.mayCarryToken(req) {
		return t.base.RoundTrip(req)
	}
	ctx := req.Context()
	tok, fetched, err := t.current(ctx)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	resp, err := t.send(req, req.Body, tok)
	if err != nil || resp.StatusCode != http.StatusUnauthorized || fetched {
		// A token obtained for this very request that is refused already
		// was this request's one new token: no loop.
		return resp, err
	}
	t.log.Debug("resource server refused the token; obtaining a new one", "method", req.Method, "host", req.URL.Host)
	next, err := t.renew(ctx, tok.AccessToken)
	if err != nil {
		discard(resp)
		return nil, err
	}
	if next.AccessToken == tok.AccessToken || !replayable(req) {
		// The issuer's current token is the refused one (the resource
		// server knows better, or lags), or the body is gone: the next
		// request uses the new token.
		return resp, nil
	}
	body := req.Body
	if req.GetBody != nil {
		if body, err = req.GetBody(); err != nil {
			return resp, nil
		}
	}
	discard(resp)
	return t.send(req, body, next)
}

// mayCarryToken reports whether req may be sent with the token: it is no
// redirect from https to plain http, and its host is one of Hosts or,
// without Hosts, it is no redirect to a host other than the one the
// application asked (http.Client drops its own Authorization
// header on such a redirect, but this transport adds the token itself, so
// it must drop it too; the redirected host's answer could also plant a
// token of its choosing through the rotation header).
func (t *Transport) mayCarryToken(req *http.Request) bool {
	first := req
	for first.Response != nil && first.Response.Request != nil {
		first = first.Response.Request
	}
	if first.URL.Scheme == "https" && req.URL.Scheme != "https" {
		return false // a redirect from TLS to plain HTTP: the token in the clear
	}
	if len(t.cfg.Hosts) > 0 {
		return slices.Contains(t.cfg.Hosts, req.URL.Host)
	}
	return first.URL.Host == req.URL.Host
}

// send sends a copy of req with body and tok, and follows the rotation header
// of its answer.
func (t *Transport) send(req *http.Request, body io.ReadCloser, tok *oauth2.Token) (*http.Response, error) {
	out := req.Clone(req.Context())
	out.Body = body
	out.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	resp, err := t.base.RoundTrip(out)
	if err != nil {
		return nil, err
	}
	t.followRotation(resp, tok.AccessToken)
	return resp, nil
}

// replayable reports whether req's body can be sent again.
func replayable(req *http.Request) bool {
	return req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
}

// discard drains and closes a response the application will not see, so its
// connection can be reused.
func discard(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
}

// closeBody closes a request body that will not be sent, as RoundTrip must.
func closeBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}
