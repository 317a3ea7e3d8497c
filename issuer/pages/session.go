package pages

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5"
)

// Session lifetimes. The idle limit is configurable (Config.SessionIdle);
// the absolute limit ends even a busy session, so a stolen cookie does not
// live for ever.
const (
	DefaultSessionIdle = 30 * time.Minute
	sessionAbsolute    = 12 * time.Hour
	// signinCookieAge bounds how long a sign-in form can be submitted.
	signinCookieAge = time.Hour
	// pruneBatch bounds the expired sessions one sign-in deletes.
	pruneBatch = 100
)

// area is one of the two signed-in areas: its own cookies, scoped to its
// path, and its own kind of session, so an account session never opens the
// admin pages even for an administrator.
type area struct {
	kind string // "account" or "admin": page_sessions.kind
	path string // "/account" or "/admin"
}

var (
	accountArea = area{kind: "account", path: "/account"}
	adminArea   = area{kind: "admin", path: "/admin"}
)

// session is a signed-in user. id is the cookie's random value: only its
// digest is stored; the CSRF token is derived from it, so a page cannot be
// posted to by anyone who cannot read the cookie.
type session struct {
	id   string
	user string
}

func (s *session) csrf() string { return deriveCSRF(s.id) }

// deriveCSRF makes the CSRF token of a secret cookie value: an HMAC keyed
// with it, so the token proves knowledge of the cookie without revealing it
// (the token is in the page; the cookie is HttpOnly).
func deriveCSRF(secret string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte("tokenpipe page csrf v1"))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// sameToken compares a submitted CSRF token in constant time.
func sameToken(got, want string) bool {
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// newSecret is a 256-bit random cookie value.
func newSecret() (string, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("random session id: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(raw), nil
}

// validSecret accepts exactly what newSecret makes, so nothing else reaches
// the database.
func validSecret(v string) bool {
	raw, err := base64.RawURLEncoding.DecodeString(v)
	return err == nil && len(raw) == 32
}

func digest(secret string) []byte {
	d := sha256.Sum256([]byte(secret))
	return d[:]
}

// errNoUser: the user signed in with a right password and was removed
// before the session could be stored.
var errNoUser = errors.New("the user no longer exists")

// startSession stores a new session for user and returns it. It always
// makes a new id, whatever cookie the browser sent (no session fixation).
// The password hash's digest is kept, so a password reset ends the session.
func (h *Handler) startSession(ctx context.Context, a area, user string) (*session, error) {
	id, err := newSecret()
	if err != nil {
		return nil, err
	}
	// Sign-ins are rare: each clears a bounded batch of expired sessions,
	// so the table needs no cleanup job.
	if _, err := h.cfg.DB.Exec(ctx, `DELETE FROM page_sessions WHERE id_digest IN (
			SELECT id_digest FROM page_sessions WHERE expires_at < now() LIMIT $1)`, pruneBatch); err != nil {
		return nil, fmt.Errorf("prune sessions: %w", err)
	}
	tag, err := h.cfg.DB.Exec(ctx, `INSERT INTO page_sessions (id_digest, kind, username, pw_fingerprint, expires_at, absolute_at)
		SELECT $1, $2, username, sha256(convert_to(password_hash, 'UTF8')), now() + make_interval(secs => $3), now() + make_interval(secs => $4)
		FROM users WHERE username = $5`,
		digest(id), a.kind, h.cfg.SessionIdle.Seconds(), sessionAbsolute.Seconds(), user)
	if err != nil {
		return nil, fmt.Errorf("store session: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return nil, errNoUser
	}
	return &session{id: id, user: user}, nil
}

// loadSession returns the session the request's cookie names, or nil when
// there is none, it expired, it is of the other area, or its user was
// removed or changed password. A live session's idle expiry moves forward,
// never past its absolute expiry.
func (h *Handler) loadSession(r *http.Request, a area) (*session, error) {
	c, err := r.Cookie(h.cookieName(r, a.kind))
	if err != nil || !validSecret(c.Value) {
		return nil, nil
	}
	var user string
	err = h.cfg.DB.QueryRow(r.Context(), `UPDATE page_sessions s SET expires_at = least(s.absolute_at, now() + make_interval(secs => $3))
		FROM users u
		WHERE s.id_digest = $1 AND s.kind = $2 AND s.expires_at > now()
		  AND u.username = s.username AND sha256(convert_to(u.password_hash, 'UTF8')) = s.pw_fingerprint
		RETURNING s.username`, digest(c.Value), a.kind, h.cfg.SessionIdle.Seconds()).Scan(&user)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read session: %w", err)
	}
	return &session{id: c.Value, user: user}, nil
}

// endSession deletes the session: sign-out takes effect on every replica.
func (h *Handler) endSession(ctx context.Context, s *session) error {
	if _, err := h.cfg.DB.Exec(ctx, `DELETE FROM page_sessions WHERE id_digest = $1`, digest(s.id)); err != nil {
		return fmt.Errorf("end session: %w", err)
	}
	return nil
}

// cookieName: over TLS the __Secure- prefix makes browsers refuse the
// cookie unless it is Secure, so a plain-HTTP page on the same host cannot
// plant one.
func (h *Handler) cookieName(r *http.Request, base string) string {
	if h.iss.Secure(r) {
		return "__Secure-tokenpipe_" + base
	}
	return "tokenpipe_" + base
}

// setCookie sets an HttpOnly, SameSite=Strict cookie on the area's path
// (Secure over TLS). maxAge 0 makes a browser-session cookie (the server
// decides expiry); negative deletes it.
func (h *Handler) setCookie(w http.ResponseWriter, r *http.Request, a area, base, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{
		Name: h.cookieName(r, base), Value: value, Path: a.path, MaxAge: maxAge,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: h.iss.Secure(r),
	})
}

// signinToken returns the CSRF token of the area's sign-in form, setting
// the pre-session cookie it is derived from if the browser has none. A
// sign-in form can then only be posted from a page of ours (no login CSRF).
func (h *Handler) signinToken(w http.ResponseWriter, r *http.Request, a area) (string, error) {
	if c, err := r.Cookie(h.cookieName(r, a.kind+"_signin")); err == nil && validSecret(c.Value) {
		return deriveCSRF(c.Value), nil
	}
	v, err := newSecret()
	if err != nil {
		return "", err
	}
	h.setCookie(w, r, a, a.kind+"_signin", v, int(signinCookieAge/time.Second))
	return deriveCSRF(v), nil
}

// signinTokenOK checks a posted sign-in form's CSRF token against the
// pre-session cookie.
func (h *Handler) signinTokenOK(r *http.Request, a area) bool {
	c, err := r.Cookie(h.cookieName(r, a.kind+"_signin"))
	return err == nil && validSecret(c.Value) && sameToken(r.PostForm.Get("csrf"), deriveCSRF(c.Value))
}
