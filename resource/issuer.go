package resource

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// DefaultTimeout bounds a call to the issuer when no timeout is set.
const DefaultTimeout = 5 * time.Second

// Introspector is a Validator that asks the issuer (RFC 7662) as a resource
// server: a client registered with the introspect permission. Answers are
// cached by the token's SHA-256 digest, never its text: a positive one for
// at most CacheTTL and never past the exp the issuer gave (for a rotated
// token, the end of its batch window), a negative one for CacheTTL. The
// issuer's own cache drops revoked tokens at once; this one cannot hear its
// notices, so CacheTTL bounds how long a revoked token may still pass here.
type Introspector struct {
	URL          string // the issuer's /oauth2/introspect
	ClientID     string
	ClientSecret string
	HTTP         *http.Client // nil: http.DefaultClient
	// CacheTTL: zero means one second; negative disables the cache.
	CacheTTL time.Duration
	// CacheSize bounds the cached answers; zero means 10,000.
	CacheSize int

	mu      sync.Mutex
	entries map[[32]byte]cached
}

type cached struct {
	tok   Token
	live  bool
	until time.Time
}

// Validate implements Validator.
func (in *Introspector) Validate(ctx context.Context, token string) (Token, error) {
	key := sha256.Sum256([]byte(token))
	now := time.Now()
	if c, ok := in.get(key, now); ok {
		if !c.live {
			return Token{}, ErrInactive
		}
		return c.tok, nil
	}
	var ans struct {
		Active   bool   `json:"active"`
		ClientID string `json:"client_id"`
		Subject  string `json:"sub"`
		Username string `json:"username"`
		Scope    string `json:"scope"`
		Exp      int64  `json:"exp"`
	}
	err := post(ctx, in.HTTP, in.URL, in.ClientID, in.ClientSecret, url.Values{"token": {token}}, &ans)
	if err != nil {
		return Token{}, fmt.Errorf("introspect: %w", err)
	}
	tok := Token{ClientID: ans.ClientID, Subject: ans.Subject, Scope: ans.Scope, Username: ans.Username, ExpiresAt: time.Unix(ans.Exp, 0)}
	until := now.Add(in.ttl())
	if ans.Active && tok.ExpiresAt.Before(until) {
		until = tok.ExpiresAt
	}
	in.put(key, cached{tok: tok, live: ans.Active, until: until}, now)
	if !ans.Active {
		return Token{}, ErrInactive
	}
	return tok, nil
}

// Remember caches tok as the answer for token, a successor the issuer has
// just handed out for a token tok was validated as: the same client, user
// and scope, live now. The client's next request then needs no
// introspection. Like any positive answer it lives CacheTTL at most.
func (in *Introspector) Remember(token string, tok Token) {
	now := time.Now()
	until := now.Add(in.ttl())
	if tok.ExpiresAt.Before(until) {
		until = tok.ExpiresAt
	}
	in.put(sha256.Sum256([]byte(token)), cached{tok: tok, live: true, until: until}, now)
}

func (in *Introspector) ttl() time.Duration {
	if in.CacheTTL == 0 {
		return time.Second
	}
	return in.CacheTTL
}

func (in *Introspector) get(key [32]byte, now time.Time) (cached, bool) {
	if in.ttl() < 0 {
		return cached{}, false
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	c, ok := in.entries[key]
	if !ok || !now.Before(c.until) {
		return cached{}, false
	}
	return c, true
}

func (in *Introspector) put(key [32]byte, c cached, now time.Time) {
	if in.ttl() < 0 {
		return
	}
	size := in.CacheSize
	if size <= 0 {
		size = 10_000
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.entries == nil {
		in.entries = map[[32]byte]cached{}
	}
	if len(in.entries) >= size {
		for k, e := range in.entries {
			if !now.Before(e.until) {
				delete(in.entries, k)
			}
		}
		if len(in.entries) >= size {
			return
		}
	}
	in.entries[key] = c
}

// Exchanger exchanges tokens for their successors (RFC 8693) at the
// issuer's token endpoint. The issuer lets only a token's own client
// exchange it, so the exchanger holds the credentials of the clients whose
// tokens it rotates (a first-party API and its apps); a token of any other
// client is served without rotation.
//
// Concurrent requests presenting one token at this server share one
// exchange (they would all get the same successor anyway), so a batch of
// parallel requests costs the issuer one exchange per server, not one per
// request.
type Exchanger struct {
	TokenURL string            // the issuer's /oauth2/token
	Clients  map[string]string // client id -> client secret
	HTTP     *http.Client      // nil: http.DefaultClient
	Timeout  time.Duration     // per exchange; zero means DefaultTimeout

	inflight singleflight.Group
}

// Successor is an exchange's answer.
type Successor struct {
	Token     string
	ExpiresIn int64
	// SuccessorExchanged: the successor was exchanged itself already, so
	// the caller holds a newer token; it must not be handed out.
	SuccessorExchanged bool
}

// Rotates reports whether tokens of clientID are exchanged.
func (x *Exchanger) Rotates(clientID string) bool {
	_, ok := x.Clients[clientID]
	return ok
}

func (x *Exchanger) timeout() time.Duration {
	if x.Timeout <= 0 {
		return DefaultTimeout
	}
	return x.Timeout
}

// Exchange returns the successor of token, a token of clientID. It returns
// ErrInactive when the issuer refuses the token (invalid_grant).
func (x *Exchanger) Exchange(ctx context.Context, clientID, token string) (Successor, error) {
	key := sha256.Sum256([]byte(token))
	v, err, _ := x.inflight.Do(string(key[:]), func() (any, error) { return x.exchange(ctx, clientID, token) })
	if err != nil {
		return Successor{}, err
	}
	return v.(Successor), nil
}

func (x *Exchanger) exchange(ctx context.Context, clientID, token string) (Successor, error) {
	var ans struct {
		AccessToken        string `json:"access_token"`
		IssuedTokenType    string `json:"issued_token_type"`
		ExpiresIn          int64  `json:"expires_in"`
		SuccessorExchanged bool   `json:"tokenpipe_successor_exchanged"`
	}
	form := url.Values{"grant_type": {"urn:ietf:params:oauth:grant-type:token-exchange"},
		"subject_token": {token}, "subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"},
		// The middleware validated the token before the handler ran, so an
		// exchange that arrives after the window (a long handler, a slow
		// network) is a late request, not a replay: the issuer refuses it
		// without revoking the family, and the client keeps the token it
		// has moved on to.
		"tokenpipe_validated": {"true"}}
	err := post(ctx, x.HTTP, x.TokenURL, clientID, x.Clients[clientID], form, &ans)
	if err != nil {
		return Successor{}, fmt.Errorf("token exchange: %w", err)
	}
	if ans.AccessToken == "" {
		return Successor{}, fmt.Errorf("token exchange: the answer carries no access_token")
	}
	return Successor{Token: ans.AccessToken, ExpiresIn: ans.ExpiresIn, SuccessorExchanged: ans.SuccessorExchanged}, nil
}

// issuerError is an RFC 6749 error answer.
type issuerError struct {
	Status int
	Code   string `json:"error"`
}

func (e *issuerError) Error() string { return fmt.Sprintf("issuer answered %d %s", e.Status, e.Code) }

// Is makes an invalid_grant refusal ErrInactive.
func (e *issuerError) Is(target error) bool {
	return target == ErrInactive && e.Code == "invalid_grant"
}

// post sends a client-authenticated form and decodes a 200 answer into v.
func post(ctx context.Context, hc *http.Client, endpoint, id, secret string, form url.Values, v any) error {
	if hc == nil {
		hc = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		e := &issuerError{Status: resp.StatusCode}
		_ = json.Unmarshal(body, e) // a body that is no RFC 6749 error still has its status
		return e
	}
	return json.Unmarshal(body, v)
}
