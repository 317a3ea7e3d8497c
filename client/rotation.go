package client

import (
	"net/http"
	"strconv"
	"time"

	"golang.org/x/oauth2"
)

// Per-request rotation: a resource server behind tokenpipe's rotation
// middleware answers a request with the successor of the token it presented.
const (
	// HeaderNextToken carries the successor access token.
	HeaderNextToken = "Tokenpipe-Next-Token"
	// HeaderNextTokenExpiresIn carries its lifetime in seconds.
	HeaderNextTokenExpiresIn = "Tokenpipe-Next-Token-Expires-In"
)

// followRotation makes the successor token in resp current, if resp answers
// a request that presented the current token (presented). An answer to an
// older token is ignored: responses of parallel requests arrive in any
// order, and an older one must never replace a newer token. A refused
// request's answer is not believed either. The headers are
// removed from resp, so an application that logs response headers never
// logs a token.
func (t *Transport) followRotation(resp *http.Response, presented string) {
	next := resp.Header.Get(HeaderNextToken)
	lifetime := resp.Header.Get(HeaderNextTokenExpiresIn)
	resp.Header.Del(HeaderNextToken)
	resp.Header.Del(HeaderNextTokenExpiresIn)
	if next == "" || resp.StatusCode == http.StatusUnauthorized {
		return
	}
	tok := &oauth2.Token{AccessToken: next, TokenType: "Bearer"}
	// Without a usable lifetime the token is kept until a 401 says it
	// ended, as x/oauth2 does with a token that has no expiry.
	if s, err := strconv.ParseInt(lifetime, 10, 64); err == nil && s > 0 {
		tok.Expiry = time.Now().Add(time.Duration(s) * time.Second)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tok == nil || t.tok.AccessToken != presented {
		return
	}
	tok.RefreshToken = t.tok.RefreshToken
	t.tok = tok
	t.log.Debug("token rotated by the resource server", "expires_in", expiresIn(tok))
}
