package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// fetchCall is one token request; everyone who needs a new token while it
// runs waits for it instead of sending another.
type fetchCall struct {
	done chan struct{}
	tok  *oauth2.Token
	err  error
}

// current returns the token to present. fetched is true when the caller
// waited for a token request to get it.
func (t *Transport) current(ctx context.Context) (tok *oauth2.Token, fetched bool, err error) {
	t.mu.Lock()
	tok = t.tok
	t.mu.Unlock()
	if tok.Valid() {
		return tok, false, nil
	}
	stale := ""
	if tok != nil {
		stale = tok.AccessToken
	}
	tok, err = t.renew(ctx, stale)
	return tok, true, err
}

// renew returns a token other than stale: the current one if another request
// already replaced stale, else the result of the one token request in
// flight, started here if none is. The request runs on its own goroutine,
// detached from ctx's cancellation: a caller that gives up does not abandon a
// refresh the issuer may already have rotated.
func (t *Transport) renew(ctx context.Context, stale string) (*oauth2.Token, error) {
	t.mu.Lock()
	if t.tok != nil && t.tok.AccessToken != stale {
		tok := t.tok
		t.mu.Unlock()
		return tok, nil
	}
	c := t.fetch
	if c == nil {
		c = &fetchCall{done: make(chan struct{})}
		t.fetch = c
		t.fetching.Add(1)
		go t.runFetch(context.WithoutCancel(ctx), c, t.epoch)
	}
	t.mu.Unlock()
	select {
	case <-c.done:
		return c.tok, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// runFetch makes the token request of c and installs its token, unless the
// application signed in anew meanwhile (epoch).
func (t *Transport) runFetch(ctx context.Context, c *fetchCall, epoch uint64) {
	defer t.fetching.Done()
	ctx, cancel := context.WithTimeout(ctx, t.cfg.TokenTimeout)
	defer cancel()
	tok, err := t.obtain(ctx)
	t.mu.Lock()
	t.settle(tok, err, epoch)
	t.fetch = nil
	t.mu.Unlock()
	c.tok, c.err = tok, err
	close(c.done)
}

// settle applies the outcome of a token request made in epoch; t.mu is held.
// A refused sign-in is forgotten, so later requests fail at once instead of
// asking again.
func (t *Transport) settle(tok *oauth2.Token, err error, epoch uint64) {
	switch {
	case t.epoch != epoch: // the application signed in anew meanwhile
	case err == nil:
		t.install(tok)
	case errors.Is(err, ErrSignInAgain):
		t.tok, t.grant = nil, Grant{}
	}
}

// install makes tok current; t.mu is held. A refresh answer without a refresh
// token keeps the one held (RFC 6749 6). Once a refresh token is held the
// password is dropped: the refresh token is the credential from then on.
func (t *Transport) install(tok *oauth2.Token) {
	if tok.RefreshToken == "" && t.tok != nil {
		tok.RefreshToken = t.tok.RefreshToken
	}
	if tok.RefreshToken != "" && t.grant.kind == kindPassword {
		t.grant = Grant{}
	}
	t.tok = tok
}

// obtain makes one token request: the refresh grant while a refresh token is
// held, else the configured grant.
func (t *Transport) obtain(ctx context.Context) (*oauth2.Token, error) {
	t.mu.Lock()
	refresh, grant := "", t.grant
	if t.tok != nil {
		refresh = t.tok.RefreshToken
	}
	t.mu.Unlock()
	ctx = context.WithValue(ctx, oauth2.HTTPClient, t.cfg.IssuerClient)
	switch {
	case refresh != "":
		tok, err := t.retrying(ctx, "refresh_token", func() (*oauth2.Token, error) {
			return t.cfg.OAuth2.TokenSource(ctx, &oauth2.Token{RefreshToken: refresh}).Token()
		})
		return tok, t.refused(err, "refresh_token")
	case grant.kind == kindPassword:
		tok, err := t.retrying(ctx, kindPassword, func() (*oauth2.Token, error) {
			return t.cfg.OAuth2.PasswordCredentialsToken(ctx, grant.username, grant.password)
		})
		return tok, t.refused(err, kindPassword)
	case grant.kind == kindClientCredentials:
		cc := clientcredentials.Config{ClientID: t.cfg.OAuth2.ClientID, ClientSecret: t.cfg.OAuth2.ClientSecret,
			TokenURL: t.cfg.OAuth2.Endpoint.TokenURL, Scopes: t.cfg.OAuth2.Scopes, AuthStyle: t.cfg.OAuth2.Endpoint.AuthStyle}
		return t.retrying(ctx, kindClientCredentials, func() (*oauth2.Token, error) { return cc.Token(ctx) })
	}
	return nil, fmt.Errorf("%w: not signed in", ErrSignInAgain)
}

// refused turns invalid_grant into ErrSignInAgain.
func (t *Transport) refused(err error, grant string) error {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) || re.ErrorCode != "invalid_grant" {
		return err
	}
	t.log.Warn("the issuer refused the sign-in; sign in again", "grant", grant, "error", re.ErrorCode)
	return fmt.Errorf("%w: the issuer refused the %s grant: %w", ErrSignInAgain, grant, err)
}

// SignIn obtains a token with grant and makes it current, ending the
// previous sign-in; use it after ErrSignInAgain. It waits for the token
// request (bounded by ctx) and returns its error.
func (t *Transport) SignIn(ctx context.Context, grant Grant) error {
	t.mu.Lock()
	t.epoch++
	t.tok, t.grant = nil, grant
	epoch := t.epoch
	t.mu.Unlock()
	tok, err := t.obtain(ctx)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.settle(tok, err, epoch)
	return err
}

// retrying calls get until it succeeds or fails for a reason other than the
// issuer being unavailable (503, or unreachable). It waits between attempts
// with exponential back-off, and at least the issuer's Retry-After; it gives
// up when the next wait would end past cfg.UnavailableWait.
func (t *Transport) retrying(ctx context.Context, grant string, get func() (*oauth2.Token, error)) (*oauth2.Token, error) {
	b := backoff.NewExponentialBackOff(backoff.WithInitialInterval(200*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second), backoff.WithMaxElapsedTime(0))
	start := time.Now()
	for {
		tok, err := get()
		after, ok := unavailable(err)
		if !ok {
			if err == nil {
				t.log.Debug("token obtained", "grant", grant, "expires_in", expiresIn(tok))
			}
			return tok, err
		}
		wait := max(b.NextBackOff(), after)
		if time.Since(start)+wait > t.cfg.UnavailableWait {
			return nil, fmt.Errorf("client: issuer unavailable for %s: %w", t.cfg.UnavailableWait, err)
		}
		t.log.Warn("issuer unavailable; retrying", "grant", grant, "status", status(err), "retry_in", wait.String())
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("client: issuer unavailable: %w (%w)", ctx.Err(), err)
		}
	}
}

// unavailable reports whether err says the issuer could not answer now (503,
// or no HTTP answer at all), and the Retry-After it asked for.
func unavailable(err error) (after time.Duration, ok bool) {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return 0, false
	}
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		if re.Response == nil || re.Response.StatusCode != http.StatusServiceUnavailable {
			return 0, false
		}
		return retryAfter(re.Response.Header.Get("Retry-After"), time.Now()), true
	}
	var ue *url.Error
	return 0, errors.As(err, &ue)
}

// retryAfter parses Retry-After: delay-seconds or an HTTP-date (RFC 9110
// 10.2.3). Anything else is no wait.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseInt(v, 10, 32); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	if at, err := http.ParseTime(v); err == nil && at.After(now) {
		return at.Sub(now)
	}
	return 0
}

// status names an unavailable answer for the log without its body.
func status(err error) string {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) && re.Response != nil {
		return strconv.Itoa(re.Response.StatusCode)
	}
	return "unreachable"
}

// expiresIn is what is left of tok's life, for the log.
func expiresIn(tok *oauth2.Token) string {
	if tok.Expiry.IsZero() {
		return "unknown"
	}
	return time.Until(tok.Expiry).Round(time.Second).String()
}
