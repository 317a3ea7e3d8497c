// Package pages serves the issuer's HTML pages: My applications (/account),
// where users see and remove the applications holding their tokens, and
// the administration pages (/admin). Server-rendered html/template pages
// and one stylesheet, embedded; no script, no external resource.
//
// Sessions live in Postgres (page_sessions), so any issuer replica serves
// any request; the browser holds only a random id in an HttpOnly,
// SameSite=Strict cookie. Every form carries a CSRF token derived from that
// id (or, on a sign-in form, from a pre-session cookie).
package pages

import (
	"context"
	"embed"
	"encoding/base64"
	"errors"
	"html/template"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
)

// Config is what the pages need besides the issuer.
type Config struct {
	DB *pgxpool.Pool
	// JS reads the pipeline panel's stream and consumers; nil in sync mode,
	// where the panel shows the rows only.
	JS       jetstream.JetStream
	Topology events.Topology
	// AdminUsers may sign in at /admin with their own password; empty
	// turns the admin pages off (404).
	AdminUsers []string
	// SessionIdle ends a session unused this long; zero means
	// DefaultSessionIdle.
	SessionIdle time.Duration
	Log         *slog.Logger
}

// Issuer is what the pages use of the token server: its throttled password
// check, its view of the transport, and the revocations and grant changes
// it announces to every instance.
type Issuer interface {
	// CheckPassword returns nil, ErrWrongPassword, a *Refused, or another
	// error (the check could not be made).
	CheckPassword(r *http.Request, endpoint, user, pass string) error
	// Secure reports whether the request came over TLS.
	Secure(r *http.Request) bool
	// RevokeApplication revokes user's tokens for client, or with user ""
	// every token of the client; ErrNoApplication when there is nothing
	// to revoke. It returns the number of stored tokens revoked.
	RevokeApplication(ctx context.Context, client, user, reason string) (int, error)
	// SetGrant allows or withdraws one grant of a client.
	SetGrant(ctx context.Context, client, grant string, allow bool, by string) error
}

var (
	// ErrWrongPassword: unknown user or wrong password.
	ErrWrongPassword = errors.New("wrong user name or password")
	// ErrNoApplication: the client is unknown or holds no token of the user.
	ErrNoApplication = errors.New("no such application")
	// ErrNoClient: no such client.
	ErrNoClient = errors.New("no such client")
)

// Refused is a sign-in refused before its password was checked: throttled
// (429 with RetryAfter) or no password check free (503).
type Refused struct {
	Status     int
	RetryAfter time.Duration
}

func (e *Refused) Error() string { return "sign-in refused: " + http.StatusText(e.Status) }

//go:embed templates/*.html
var templateFiles embed.FS

//go:embed static/style.css
var styleCSS []byte

// Handler serves the pages.
type Handler struct {
	cfg   Config
	iss   Issuer
	pages map[string]*template.Template
}

// New parses the embedded templates; a broken template is a programming
// error and panics.
func New(cfg Config, iss Issuer) *Handler {
	if cfg.SessionIdle <= 0 {
		cfg.SessionIdle = DefaultSessionIdle
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{cfg: cfg, iss: iss, pages: map[string]*template.Template{}}
	for _, name := range []string{"signin", "account", "confirm", "admin", "adminuser", "pipeline", "message"} {
		t := template.New("layout.html").Funcs(funcs)
		h.pages[name] = template.Must(t.ParseFS(templateFiles, "templates/layout.html", "templates/"+name+".html"))
	}
	return h
}

// Register adds the pages' routes. The JSON management API keeps its own
// routes (/account/applications, /admin/users/..., /admin/clients/...).
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /pages/style.css", h.style)
	mux.HandleFunc("GET /account", h.account)
	mux.HandleFunc("POST /account/signin", h.accountSignin)
	mux.HandleFunc("POST /account/signout", h.signout(accountArea))
	mux.HandleFunc("GET /account/remove", h.accountConfirmRemove)
	mux.HandleFunc("POST /account/remove", h.accountRemove)

	mux.HandleFunc("GET /admin", h.adminOnly(h.admin))
	mux.HandleFunc("POST /admin/signin", h.adminOnly(h.adminSignin))
	mux.HandleFunc("POST /admin/signout", h.adminOnly(h.signout(adminArea)))
	mux.HandleFunc("POST /admin/grant", h.adminOnly(h.adminGrant))
	mux.HandleFunc("GET /admin/revoke", h.adminOnly(h.adminConfirmRevoke))
	mux.HandleFunc("POST /admin/revoke", h.adminOnly(h.adminRevoke))
	mux.HandleFunc("GET /admin/user", h.adminOnly(h.adminUser))
	mux.HandleFunc("GET /admin/user/remove", h.adminOnly(h.adminConfirmRemove))
	mux.HandleFunc("POST /admin/user/remove", h.adminOnly(h.adminRemove))
	mux.HandleFunc("GET /admin/pipeline", h.adminOnly(h.pipeline))
}

// csp allows the stylesheet and same-origin forms only: no script at all,
// no framing, no <base> rewriting.
const csp = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"

func (h *Handler) style(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/css; charset=utf-8")
	w.Header().Set("Cache-Control", "public, max-age=3600")
	_, _ = w.Write(styleCSS)
}

// view is what every page template gets.
type view struct {
	Title   string
	Area    string // "account" or "admin": which sign-out form the header shows
	User    string // signed-in user, "" on sign-in pages
	CSRF    string
	Flash   string
	Error   string
	Refresh int // seconds; 0: the page does not refresh itself
	Data    any
}

// render writes a page. Every page is no-store: they show personal data or
// the administration, and a shared computer's back button must not bring
// them back after sign-out.
func (h *Handler) render(w http.ResponseWriter, status int, name string, v view) {
	hd := w.Header()
	hd.Set("Content-Type", "text/html; charset=utf-8")
	hd.Set("Content-Security-Policy", csp)
	hd.Set("Cache-Control", "no-store")
	hd.Set("Pragma", "no-cache")
	var b strings.Builder
	if err := h.pages[name].Execute(&b, v); err != nil {
		h.cfg.Log.Error("render page", "page", name, "err", err)
		http.Error(w, "page could not be rendered", http.StatusInternalServerError)
		return
	}
	w.WriteHeader(status)
	_, _ = w.Write([]byte(b.String()))
}

// message renders a page that only says something (an error, mostly).
func (h *Handler) message(w http.ResponseWriter, status int, area, text string) {
	h.render(w, status, "message", view{Title: http.StatusText(status), Area: area, Error: text})
}

// fail answers a request whose work failed: logged, and a 503 page that
// says nothing about the cause.
func (h *Handler) fail(w http.ResponseWriter, a area, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	h.cfg.Log.Error("page request failed", "area", a.kind, "err", err)
	w.Header().Set("Retry-After", "1")
	h.message(w, http.StatusServiceUnavailable, a.kind, "The service is temporarily unavailable. Try again in a moment.")
}

// maxForm bounds a posted form.
const maxForm = 8 << 10

// readForm parses a posted form and checks that it came from one of our
// pages: a browser's Sec-Fetch-Site must not say cross-site (defence in
// depth; older browsers do not send it), and ok, called once the form is
// parsed, must accept its CSRF token. It answers 403 itself and returns
// false when the form is refused.
func (h *Handler) readForm(w http.ResponseWriter, r *http.Request, a area, ok func() bool) bool {
	if site := r.Header.Get("Sec-Fetch-Site"); site == "cross-site" || site == "same-site" {
		h.message(w, http.StatusForbidden, a.kind, "This form was sent from another site and was refused.")
		return false
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxForm)
	if err := r.ParseForm(); err != nil {
		h.message(w, http.StatusBadRequest, a.kind, "The form could not be read.")
		return false
	}
	if !ok() {
		h.message(w, http.StatusForbidden, a.kind, "The form has expired or did not come from this site. Go back, reload the page and try again.")
		return false
	}
	return true
}

// redirect sends the browser to one of our own paths after a form (303,
// so a reload does not post again). Targets are always built here from a
// fixed path and escaped values, never taken from the request: no open
// redirect.
func redirect(w http.ResponseWriter, r *http.Request, path string) {
	http.Redirect(w, r, path, http.StatusSeeOther)
}

// setFlash leaves a one-time message for the next page of the area.
func (h *Handler) setFlash(w http.ResponseWriter, r *http.Request, a area, text string) {
	h.setCookie(w, r, a, a.kind+"_flash", base64.RawURLEncoding.EncodeToString([]byte(text)), 60)
}

// takeFlash reads and clears the area's one-time message.
func (h *Handler) takeFlash(w http.ResponseWriter, r *http.Request, a area) string {
	c, err := r.Cookie(h.cookieName(r, a.kind+"_flash"))
	if err != nil {
		return ""
	}
	h.setCookie(w, r, a, a.kind+"_flash", "", -1)
	text, err := base64.RawURLEncoding.DecodeString(c.Value)
	if err != nil || len(text) > 300 {
		return ""
	}
	return string(text)
}

// signinFailure renders a sign-in form again after a refused sign-in.
func (h *Handler) signinFailure(w http.ResponseWriter, r *http.Request, a area, user string, err error) {
	var refused *Refused
	switch {
	case errors.Is(err, ErrWrongPassword):
		msg := "The user name or password is wrong."
		if a == adminArea {
			msg = "The user name or password is wrong, or this user is not an administrator."
		}
		h.signinForm(w, r, a, http.StatusUnauthorized, user, msg, "")
	case errors.As(err, &refused) && refused.Status == http.StatusTooManyRequests:
		secs := int64((refused.RetryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
		h.signinForm(w, r, a, http.StatusTooManyRequests, user,
			"Too many failed sign-ins. Wait "+strconv.FormatInt(secs, 10)+" seconds before trying again.", "")
	case errors.As(err, &refused):
		w.Header().Set("Retry-After", "1")
		h.signinForm(w, r, a, refused.Status, user, "Too many sign-ins are being checked right now. Try again in a moment.", "")
	default:
		h.fail(w, a, err)
	}
}

// signinForm renders the area's sign-in form.
func (h *Handler) signinForm(w http.ResponseWriter, r *http.Request, a area, status int, user, errText, flash string) {
	token, err := h.signinToken(w, r, a)
	if err != nil {
		h.fail(w, a, err)
		return
	}
	title := "My applications: sign in"
	if a == adminArea {
		title = "Administration: sign in"
	}
	h.render(w, status, "signin", view{Title: title, Area: a.kind, CSRF: token, Error: errText, Flash: flash,
		Data: map[string]string{"Action": a.path + "/signin", "User": user}})
}

// signin handles a posted sign-in form of either area. allowed says
// whether a user with the right password may enter the area.
func (h *Handler) signin(w http.ResponseWriter, r *http.Request, a area, allowed func(string) bool) {
	if !h.readForm(w, r, a, func() bool { return h.signinTokenOK(r, a) }) {
		return
	}
	user, pass := r.PostForm.Get("username"), r.PostForm.Get("password")
	if user == "" || pass == "" {
		h.signinForm(w, r, a, http.StatusBadRequest, user, "Enter your user name and password.", "")
		return
	}
	err := h.iss.CheckPassword(r, a.kind+"_page", user, pass)
	if err == nil && !allowed(user) {
		err = ErrWrongPassword
	}
	if err != nil {
		h.signinFailure(w, r, a, user, err)
		return
	}
	// A session the browser already had ends: one browser, one session.
	if old, err := h.loadSession(r, a); err == nil && old != nil {
		if err := h.endSession(r.Context(), old); err != nil {
			h.fail(w, a, err)
			return
		}
	}
	s, err := h.startSession(r.Context(), a, user)
	if errors.Is(err, errNoUser) {
		h.signinFailure(w, r, a, user, ErrWrongPassword)
		return
	}
	if err != nil {
		h.fail(w, a, err)
		return
	}
	h.setCookie(w, r, a, a.kind+"_signin", "", -1)
	h.setCookie(w, r, a, a.kind, s.id, 0)
	h.cfg.Log.Info("page sign-in", "area", a.kind, "user", user)
	redirect(w, r, a.path)
}

// signout ends the area's session. It needs the session's CSRF token, so
// another site cannot sign a user out.
func (h *Handler) signout(a area) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s, ok := h.requireSession(w, r, a)
		if !ok {
			return
		}
		if !h.readForm(w, r, a, func() bool { return sameToken(r.PostForm.Get("csrf"), s.csrf()) }) {
			return
		}
		if err := h.endSession(r.Context(), s); err != nil {
			h.fail(w, a, err)
			return
		}
		h.setCookie(w, r, a, a.kind, "", -1)
		h.setFlash(w, r, a, "You are signed out.")
		redirect(w, r, a.path)
	}
}

// requireSession returns the area's session, or sends the browser to the
// area's sign-in page and returns false.
func (h *Handler) requireSession(w http.ResponseWriter, r *http.Request, a area) (*session, bool) {
	s, err := h.loadSession(r, a)
	if err != nil {
		h.fail(w, a, err)
		return nil, false
	}
	if s == nil || (a == adminArea && !h.isAdmin(s.user)) {
		if r.Method == http.MethodPost {
			// A form posted after the session ended: nothing is done.
			h.message(w, http.StatusForbidden, a.kind, "Your session has ended. Sign in again.")
			return nil, false
		}
		redirect(w, r, a.path)
		return nil, false
	}
	return s, true
}

func (h *Handler) isAdmin(user string) bool { return slices.Contains(h.cfg.AdminUsers, user) }

// adminOnly answers 404 while no administrator is configured, as the JSON
// admin API does without its token.
func (h *Handler) adminOnly(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if len(h.cfg.AdminUsers) == 0 {
			http.NotFound(w, r)
			return
		}
		next(w, r)
	}
}

var funcs = template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.UTC().Format("2006-01-02 15:04 UTC")
	},
	"whenp": func(t *time.Time) string {
		if t == nil {
			return "-"
		}
		return t.UTC().Format("2006-01-02 15:04 UTC")
	},
	"join": strings.Join,
	// scopes shows at most six scopes and how many more there are: a
	// client may be allowed hundreds.
	"scopes": func(s []string) string {
		if len(s) == 0 {
			return "-"
		}
		if len(s) <= 6 {
			return strings.Join(s, " ")
		}
		return strings.Join(s[:6], " ") + " and " + strconv.Itoa(len(s)-6) + " more"
	},
	"seconds": func(f *float64) string {
		return (time.Duration(*f * float64(time.Second))).Round(time.Millisecond).String()
	},
	"bytes": func(n uint64) string {
		switch {
		case n >= 1<<30:
			return strconv.FormatFloat(float64(n)/(1<<30), 'f', 1, 64) + " GiB"
		case n >= 1<<20:
			return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
		case n >= 1<<10:
			return strconv.FormatFloat(float64(n)/(1<<10), 'f', 1, 64) + " KiB"
		}
		return strconv.FormatUint(n, 10) + " B"
	},
	// retention says how far back a replay can reach.
	"retention": func(maxAge float64, maxBytes int64) string {
		age, size := "no age limit", "no size limit"
		if maxAge > 0 {
			age = "max age " + (time.Duration(maxAge * float64(time.Second))).String()
		}
		if maxBytes > 0 {
			size = "max " + strconv.FormatInt(maxBytes, 10) + " bytes"
		}
		return age + ", " + size
	},
}
