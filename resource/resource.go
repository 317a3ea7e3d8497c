// Package resource protects an HTTP API with tokenpipe's access tokens and,
// optionally, rotates them on every request (per-request rotation, the
// devise_token_auth model without its bugs).
//
// Middleware validates the bearer token of each request (Introspector asks
// the issuer, with a small cache; any Validator will do) and answers 401
// when it is not active. With an Exchanger it also exchanges the token for
// its successor (RFC 8693) and returns the successor in the response header
// Tokenpipe-Next-Token, with its lifetime in Tokenpipe-Next-Token-Expires-In
// (seconds). The rules:
//
//   - The presented token stays valid for the issuer's batch window after
//     its first exchange, and every exchange of it inside the window gets
//     the same successor, so parallel requests of one client need no
//     coordination; after the window it is dead, always: its validity ends
//     at a bounded time.
//   - A request gets the header only while the successor it would carry has
//     not been exchanged itself. A client that already presented the
//     successor (it holds a newer token) therefore never receives the older
//     one again, and a client whose answer was lost (a cancelled request)
//     gets the same successor on its next request inside the window.
//   - The exchange runs when the response's headers are written, after the
//     handler, and not at all when the client has gone away; its context is
//     the client's request's, and the issuer starts the window only with an
//     answer its caller is still waiting for: a cancelled request never uses
//     up the client's token.
package resource

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The response headers that carry the successor token. Clients (package
// client) rely on these names.
const (
	HeaderNextToken          = "Tokenpipe-Next-Token"
	HeaderNextTokenExpiresIn = "Tokenpipe-Next-Token-Expires-In"
)

// Token is what the middleware knows of a request's valid token; handlers
// read it with FromContext.
type Token struct {
	ClientID, Subject, Scope string
	Username                 string
	ExpiresAt                time.Time
}

// Validator decides whether a bearer token is active. It returns
// ErrInactive for a token that is not; any other error is answered 503.
type Validator interface {
	Validate(ctx context.Context, token string) (Token, error)
}

// rememberer is a Validator that can be told of a successor's answer in
// advance (Introspector), sparing the issuer one introspection per rotation.
type rememberer interface {
	Remember(token string, tok Token)
}

// ErrInactive: the token is unknown, expired, revoked, superseded, or its
// batch window has passed.
var ErrInactive = errors.New("resource: the token is not active")

type ctxKey struct{}

// FromContext returns the validated token of a request served by
// Middleware.
func FromContext(ctx context.Context) (Token, bool) {
	t, ok := ctx.Value(ctxKey{}).(Token)
	return t, ok
}

// Middleware wraps handlers with token validation and, when Exchanger is
// set, per-request rotation.
type Middleware struct {
	Validator Validator
	// Exchanger rotates the tokens of the clients it holds credentials
	// for; nil turns rotation off.
	Exchanger *Exchanger
	// Log receives failures to rotate (never a token); nil discards them.
	Log *slog.Logger
}

// Wrap returns next behind the middleware.
func (m *Middleware) Wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		text, ok := bearer(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tokenpipe"`)
			http.Error(w, "a bearer token is required", http.StatusUnauthorized)
			return
		}
		tok, err := m.Validator.Validate(r.Context(), text)
		if errors.Is(err, ErrInactive) {
			unauthorized(w)
			return
		}
		if err != nil {
			m.log().Warn("cannot validate a bearer token", "err", err)
			w.Header().Set("Retry-After", "1")
			http.Error(w, "the token cannot be checked now", http.StatusServiceUnavailable)
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), ctxKey{}, tok))
		if m.Exchanger == nil || !m.Exchanger.Rotates(tok.ClientID) {
			next.ServeHTTP(w, r)
			return
		}
		rw := &rotatingWriter{ResponseWriter: w, rotate: func(h http.Header) { m.rotate(r, h, tok, text) }}
		next.ServeHTTP(rw, r)
		rw.once.Do(rw.run) // a handler that wrote nothing: net/http sends 200 after this
	})
}

// rotate exchanges the presented token and puts the successor into h, when
// the client may have it.
func (m *Middleware) rotate(r *http.Request, h http.Header, tok Token, text string) {
	if r.Context().Err() != nil {
		return // the client is gone: leave its token as it is
	}
	// Tied to the client's request: if the client goes away during the
	// exchange, the issuer does not count it (its answer has nobody to go
	// to) and the client's token stays as it was.
	ctx, cancel := context.WithTimeout(r.Context(), m.Exchanger.timeout())
	defer cancel()
	next, err := m.Exchanger.Exchange(ctx, tok.ClientID, text)
	if err != nil {
		// The token was valid when the request started; the handler has
		// answered. Without a successor the client keeps its token: inside
		// the window it is valid, and a refused exchange shows as 401 on its
		// next request.
		if !errors.Is(err, ErrInactive) {
			m.log().Warn("token exchange failed; answering without a successor", "err", err, "client_id", tok.ClientID)
		}
		return
	}
	if next.SuccessorExchanged {
		return // the client already holds a newer token than this successor
	}
	if r, ok := m.Validator.(rememberer); ok {
		tok.ExpiresAt = time.Now().Add(time.Duration(next.ExpiresIn) * time.Second)
		r.Remember(next.Token, tok)
	}
	h.Set(HeaderNextToken, next.Token)
	h.Set(HeaderNextTokenExpiresIn, strconv.FormatInt(next.ExpiresIn, 10))
	// A response carrying a credential must not be stored by any cache.
	h.Set("Cache-Control", "no-store")
}

func (m *Middleware) log() *slog.Logger {
	if m.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return m.Log
}

// bearer reads an RFC 6750 Authorization: Bearer credential.
func bearer(r *http.Request) (string, bool) {
	scheme, text, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	text = strings.TrimSpace(text)
	return text, text != "" && !strings.ContainsAny(text, " \t")
}

func unauthorized(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="tokenpipe", error="invalid_token"`)
	http.Error(w, "the token is not active", http.StatusUnauthorized)
}

// rotatingWriter runs the exchange just before the response's headers go
// out, whichever way the handler starts its answer.
type rotatingWriter struct {
	http.ResponseWriter
	once   sync.Once
	rotate func(http.Header)
}

func (w *rotatingWriter) run() { w.rotate(w.ResponseWriter.Header()) }

func (w *rotatingWriter) WriteHeader(code int) {
	w.once.Do(w.run)
	w.ResponseWriter.WriteHeader(code)
}

func (w *rotatingWriter) Write(p []byte) (int, error) {
	w.once.Do(w.run)
	return w.ResponseWriter.Write(p)
}

// Flush lets streaming handlers flush through the wrapper.
func (w *rotatingWriter) Flush() {
	w.once.Do(w.run)
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap serves http.ResponseController.
func (w *rotatingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
