// Package issuer is the stateless OAuth2 token endpoint (RFC 6749). It mints
// a token, publishes its TokenIssued event to JetStream, and answers the
// client only once JetStream has acknowledged the event, so a token a client
// holds is never lost. Only SHA-256 digests of tokens leave the process.
package issuer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/proxy"
	"github.com/tokenpipe/tokenpipe/internal/throttle"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
	"github.com/tokenpipe/tokenpipe/issuer/pages"
)

// Persistence modes.
const (
	ModeAsync = "async" // publish to JetStream, answer after its ack
	ModeSync  = "sync"  // write the row inside the request
)

// Defaults for Config fields left zero.
const (
	DefaultTokenTTL            = time.Hour
	DefaultRefreshTTL          = 720 * time.Hour
	DefaultPublishTimeout      = 2 * time.Second
	DefaultMaxInFlight         = 4096
	DefaultSyncConflictRetries = 5
	DefaultMaxBodyBytes        = 8192
	DefaultCoalesceWindow      = 5 * time.Second
	DefaultRefreshGrace        = 5 * time.Second
	DefaultRotationWindow      = 5 * time.Second
	DefaultIntrospectCacheTTL  = 5 * time.Second
	DefaultIntrospectCacheSize = 100_000
	DefaultPasswordCheckWait   = 500 * time.Millisecond
)

// maxClockSkew bounds how far issuer clocks may disagree with the database's.
// A token without a row yet is taken as revoked by a grant revocation that
// happened after its issue time minus this: conservative, and only until its
// row (which decides by stream sequence) is written.
const maxClockSkew = time.Minute

// Config tunes the issuer. Zero fields take the defaults above.
type Config struct {
	// Mode is ModeAsync (also when empty) or ModeSync.
	Mode string
	// TokenTTL is the access token lifetime: expires_in and the event's
	// ExpiresAt.
	TokenTTL time.Duration
	// RefreshTTL is the refresh token lifetime.
	RefreshTTL time.Duration
	// Keys signs and verifies tokens; required. Every instance must share
	// the first key, or coalescing and refresh rotation stop agreeing.
	Keys *tokens.Keyring
	// CoalesceWindow: identical token requests inside one window of this
	// length get the same token. Zero means the default; negative disables.
	CoalesceWindow time.Duration
	// RefreshGrace: concurrent redemptions of one refresh token within this
	// long of the first all get the same new pair; a later one is reuse and
	// revokes the family. Zero means the default; negative means none.
	RefreshGrace time.Duration
	// RotationWindow: a token exchanged for its successor (per-request
	// rotation) stays valid this long after the first answered exchange, and
	// every exchange of it inside the window gets the same successor; a later
	// exchange is refused. Zero means the default; negative means none.
	RotationWindow time.Duration
	// RotationReuseKeeps: an exchange after the window is only refused.
	// Otherwise (the default) it is taken as a replayed, stolen token, and
	// the token's family is revoked, successors included.
	RotationReuseKeeps bool
	// IntrospectCacheTTL bounds how long a positive introspection answer is
	// reused; revocation and deactivation notices end it sooner. Zero means
	// the default; negative disables the cache.
	IntrospectCacheTTL time.Duration
	// IntrospectCacheSize bounds the cached answers.
	IntrospectCacheSize int
	// AdminToken guards the /admin API (Authorization: Bearer); empty
	// disables it.
	AdminToken string
	// AdminUsers may sign in to the /admin pages with their own password;
	// empty turns the pages off (404). The JSON API keeps AdminToken.
	AdminUsers []string
	// PageSessionIdle ends a page session unused this long; zero means
	// pages.DefaultSessionIdle.
	PageSessionIdle time.Duration
	// PublishTimeout bounds the wait for JetStream's ack, including the
	// wait for a free in-flight slot; past it the answer is 503.
	PublishTimeout time.Duration
	// PublishWindow gathers the publishes of concurrent requests for this
	// long and sends them together (see publishBatch); 0 sends each at once.
	PublishWindow time.Duration
	// MaxInFlight bounds the publishes awaiting an ack, shared by all
	// requests. Only NewJetStream reads it: the bound lives in the
	// JetStream handle.
	MaxInFlight int
	// SyncConflictRetries is how often sync mode retries a transaction that
	// lost a race for its key: zero means the default, negative means never.
	SyncConflictRetries int
	// Instance names this issuer in events; empty is allowed.
	Instance string
	// MaxBodyBytes bounds the request body; larger bodies get 413.
	MaxBodyBytes int64
	// RequireTLS refuses every request that can carry a credential (all
	// endpoints but the metadata document) unless it came over TLS: served
	// here (TLSCertFile) or through one of TrustedProxies that set
	// X-Forwarded-Proto: https.
	RequireTLS bool
	// TLSCertFile and TLSKeyFile, when set, make ServeListener serve HTTPS
	// (TLS 1.2 and newer) with this PEM certificate chain and key. A change
	// of either file is picked up without a restart.
	TLSCertFile string
	TLSKeyFile  string
	// IssuerURL is the RFC 8414 issuer identifier (see ValidateIssuerURL);
	// the metadata document lists the endpoints under it. Empty: the
	// metadata endpoint answers 404, as the service cannot know its public
	// URL and must not take it from the request.
	IssuerURL string
	// Topology names the stream and subject events are published to.
	Topology events.Topology
	// Login throttles password sign-ins, by the password grant and the
	// account API alike, per (user, source), user and source. Zero fields
	// take the throttle package's defaults.
	Login throttle.Config
	// PasswordChecks bounds the bcrypt password checks running at once;
	// zero means half the CPUs, rounded up. The client_credentials and
	// refresh_token grants never wait for one.
	PasswordChecks int
	// PasswordCheckWait bounds a request's wait for a free password check;
	// past it the answer is 503. Zero means the default; negative, no wait.
	PasswordCheckWait time.Duration
	// TrustedProxies are the reverse proxies whose forwarding headers are
	// believed: X-Forwarded-Proto for RequireTLS, X-Forwarded-For for a
	// sign-in's source address. The zero value trusts none.
	TrustedProxies proxy.Trusted
}

func (c Config) withDefaults() Config {
	if c.Mode == "" {
		c.Mode = ModeAsync
	}
	if c.TokenTTL <= 0 {
		c.TokenTTL = DefaultTokenTTL
	}
	if c.RefreshTTL <= 0 {
		c.RefreshTTL = DefaultRefreshTTL
	}
	if c.PublishTimeout <= 0 {
		c.PublishTimeout = DefaultPublishTimeout
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = DefaultMaxInFlight
	}
	switch {
	case c.SyncConflictRetries == 0:
		c.SyncConflictRetries = DefaultSyncConflictRetries
	case c.SyncConflictRetries < 0:
		c.SyncConflictRetries = 0
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	c.CoalesceWindow = orDefault(c.CoalesceWindow, DefaultCoalesceWindow)
	c.RefreshGrace = orDefault(c.RefreshGrace, DefaultRefreshGrace)
	c.RotationWindow = orDefault(c.RotationWindow, DefaultRotationWindow)
	c.IntrospectCacheTTL = orDefault(c.IntrospectCacheTTL, DefaultIntrospectCacheTTL)
	if c.IntrospectCacheSize <= 0 {
		c.IntrospectCacheSize = DefaultIntrospectCacheSize
	}
	c.PasswordCheckWait = orDefault(c.PasswordCheckWait, DefaultPasswordCheckWait)
	return c
}

// orDefault maps zero to def and negative to zero (off).
func orDefault(d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return d
}

// Server answers the OAuth endpoints: token, revoke, introspect, and the
// management API.
type Server struct {
	cfg      Config
	registry *clients.Registry
	nc       *nats.Conn // nil in sync mode
	js       jetstream.JetStream
	db       *pgxpool.Pool
	log      *slog.Logger
	metrics  *Metrics
	cache    *introCache
	// now cuts coalescing windows; tests replace it to replay window edges.
	now     func() time.Time
	logins  *throttle.Limiter
	hashers *throttle.Pool
	pages   *pages.Handler
	batch   *publishBatch
}

// NewJetStream returns the JetStream handle async mode needs: at most
// cfg.MaxInFlight publishes await an ack at once, shared by all requests, and
// a pending ack is given up after cfg.PublishTimeout, so an ack that never
// comes cannot hold a slot for ever.
func NewJetStream(nc *nats.Conn, cfg Config) (jetstream.JetStream, error) {
	cfg = cfg.withDefaults()
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(cfg.MaxInFlight),
		jetstream.WithPublishAsyncTimeout(cfg.PublishTimeout))
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	return js, nil
}

// New returns a token endpoint. registry, db, log and m are required. In
// async mode nc and js are required too, and js must bound its in-flight
// publishes: create it with NewJetStream (or jetstream.New with
// WithPublishAsyncMaxPending), or one slow ack window lets pending publishes
// grow without limit. In sync mode nc and js may be nil.
//
// cfg.Keys is required: New panics without it, as a programming error.
func New(cfg Config, registry *clients.Registry, nc *nats.Conn, js jetstream.JetStream, db *pgxpool.Pool, log *slog.Logger, m *Metrics) *Server {
	cfg = cfg.withDefaults()
	if cfg.Keys == nil {
		panic("issuer: Config.Keys is required")
	}
	s := &Server{cfg: cfg, registry: registry, nc: nc, js: js, db: db, log: log, metrics: m,
		cache:   newIntroCache(cfg.IntrospectCacheTTL, cfg.IntrospectCacheSize),
		logins:  throttle.New(cfg.Login),
		hashers: throttle.NewPool(cfg.PasswordChecks, cfg.PasswordCheckWait),
		batch:   &publishBatch{window: cfg.PublishWindow},
		now:     time.Now}
	s.pages = pages.New(pages.Config{DB: db, JS: s.grantStream(), Topology: cfg.Topology,
		AdminUsers: cfg.AdminUsers, SessionIdle: cfg.PageSessionIdle, Log: log}, pagesBackend{s})
	return s
}

// Handler routes the OAuth endpoints and the management API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/oauth2/token", s.token)
	mux.HandleFunc("/oauth2/revoke", s.revoke)
	mux.HandleFunc("/oauth2/introspect", s.introspect)
	mux.HandleFunc(metadataPath, s.metadata)
	s.manageRoutes(mux)
	s.pages.Register(mux)
	return s.metrics.instrument(s.guard(mux))
}

// oauthError is an RFC 6749 section 5.2 error.
type oauthError struct {
	status int
	code   string
	desc   string
	// retryAfter, if set, is sent as Retry-After (whole seconds, rounded up).
	retryAfter time.Duration
}

func (e *oauthError) Error() string { return e.code + ": " + e.desc }

func badRequest(code, desc string) *oauthError {
	return &oauthError{status: http.StatusBadRequest, code: code, desc: desc}
}

// invalidClient is a 401: writeError adds the WWW-Authenticate challenge
// every 401 needs (RFC 9110 15.5.2), whichever way the client authenticated.
func invalidClient(desc string) *oauthError {
	return &oauthError{status: http.StatusUnauthorized, code: "invalid_client", desc: desc}
}

var errUnavailable = &oauthError{status: http.StatusServiceUnavailable, code: "temporarily_unavailable",
	desc: "the token could not be recorded; retry shortly"}

// errUnconfirmed is errUnavailable after a publish whose outcome is unknown
// (ack timeout, client gone): JetStream may still store the event.
var errUnconfirmed = &oauthError{status: http.StatusServiceUnavailable, code: "temporarily_unavailable",
	desc: "the token could not be recorded; retry shortly"}

type tokenResponse struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	Scope        string `json:"scope,omitempty"`
	RefreshToken string `json:"refresh_token,omitempty"`
	// IssuedTokenType is RFC 8693's, in token exchange answers only.
	IssuedTokenType string `json:"issued_token_type,omitempty"`
	// SuccessorExchanged: a token exchange answered with a successor that
	// was itself exchanged already, so whoever presented the subject token
	// also holds a newer one. A resource server must not pass it on (see
	// package resource).
	SuccessorExchanged bool `json:"tokenpipe_successor_exchanged,omitempty"`
}

func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	resp, err := s.issue(r)
	if err != nil {
		s.writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// writeError answers with an RFC 6749 5.2 error; anything that is not an
// oauthError is logged and answered 503.
func (s *Server) writeError(w http.ResponseWriter, err error) {
	var oe *oauthError
	if !errors.As(err, &oe) {
		// A client that went away is no server error: logging those at
		// error level would let any client flood the log.
		if errors.Is(err, context.Canceled) {
			s.log.Debug("request abandoned by the client", "err", err)
		} else {
			s.log.Error("request failed", "err", err)
		}
		oe = errUnavailable
	}
	switch {
	case oe.retryAfter > 0:
		w.Header().Set("Retry-After", strconv.FormatInt(int64((oe.retryAfter+time.Second-1)/time.Second), 10))
	case oe.status == http.StatusMethodNotAllowed:
		w.Header().Set("Allow", http.MethodPost)
	case oe.status == http.StatusUnauthorized:
		w.Header().Set("WWW-Authenticate", `Basic realm="tokenpipe"`)
	case oe.status == http.StatusServiceUnavailable:
		w.Header().Set("Retry-After", "1")
	}
	writeJSON(w, oe.status, map[string]string{"error": oe.code, "error_description": oe.desc})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	h := w.Header()
	h["Content-Type"] = fixedHeaders.json
	h["Cache-Control"] = fixedHeaders.noStore
	h["Pragma"] = fixedHeaders.noCache
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// issue validates the request completely before minting anything, so bad
// input never produces an event or a row.
func (s *Server) issue(r *http.Request) (*tokenResponse, error) {
	req, err := parseRequest(r, s.cfg.MaxBodyBytes)
	if err != nil {
		return nil, err
	}
	form := req.form
	client, err := s.authenticate(r.Context(), req)
	if err != nil {
		return nil, err
	}
	grant := form.Get("grant_type")
	var subject string
	switch grant {
	case "":
		return nil, badRequest("invalid_request", "grant_type is required")
	case "client_credentials":
		if !client.Allows(grant) {
			return nil, badRequest("unauthorized_client", "this client may not use the client_credentials grant")
		}
		// RFC 6749 4.4: the client acts on its own behalf.
		subject = client.ID
	case "refresh_token":
		if !client.Allows(grant) {
			return nil, badRequest("unauthorized_client", "this client may not use refresh tokens")
		}
		return s.refresh(r.Context(), client, form)
	case tokens.GrantTokenExchange:
		if !client.Allows(grant) {
			return nil, badRequest("unauthorized_client", "this client may not use token exchange")
		}
		return s.exchange(r.Context(), client, form)
	case "password":
		if subject, err = s.resourceOwner(r, client, form); err != nil {
			return nil, err
		}
	default:
		return nil, badRequest("unsupported_grant_type", "supported grant types: client_credentials, password, refresh_token, "+tokens.GrantTokenExchange)
	}
	scopes, err := requestedScopes(client, form.Get("scope"))
	if err != nil {
		return nil, err
	}
	// Refresh tokens go with the password grant (RFC 6749 4.4.3: not with
	// client_credentials), and only to clients allowed to redeem them.
	withRefresh := grant == "password" && client.Allows("refresh_token")
	rq := request{clientID: client.ID, subject: subject, grant: grant, scopes: scopes, refresh: withRefresh}
	// A refresh token has one holder: two sign-ins sharing one (two
	// devices in one window) would make the second's first refresh look like
	// reuse once the first rotated, and revoke both. Sign-ins are rare and
	// bounded by the password checks, so minting each afresh costs little.
	if s.cfg.CoalesceWindow <= 0 || withRefresh {
		sp, err := randomSpec(rq, time.Now())
		if err != nil {
			return nil, err
		}
		return s.mintFresh(r.Context(), sp)
	}
	return s.mintCoalesced(r.Context(), rq)
}

// resourceOwner authenticates the resource owner of a password grant
// (RFC 6749 4.3) and returns the user name.
func (s *Server) resourceOwner(r *http.Request, client *clients.Client, form url.Values) (string, error) {
	if !client.Allows("password") {
		return "", badRequest("unauthorized_client", "this client may not use the password grant")
	}
	user, pass := form.Get("username"), form.Get("password")
	if user == "" || pass == "" {
		return "", badRequest("invalid_request", "username and password are required")
	}
	if err := s.checkPassword(r, "token", user, pass); err != nil {
		if errors.Is(err, clients.ErrInvalidGrant) {
			return "", badRequest("invalid_grant", "the resource owner credentials are invalid")
		}
		return "", err
	}
	return user, nil
}

// requestedScopes canonicalises the scope parameter and checks it against
// the client's registration. An absent or empty parameter means the client's
// full allowed set (RFC 6749 3.3 lets the server pick a default); a present
// one must be a subset of it.
func requestedScopes(client *clients.Client, raw string) ([]string, error) {
	scopes := client.Scopes
	if raw != "" {
		if err := checkScopeSyntax(raw); err != nil {
			return nil, err
		}
		scopes = events.CanonicalScopes(raw)
		for _, sc := range scopes {
			if !client.AllowsScope(sc) {
				return nil, badRequest("invalid_scope", fmt.Sprintf("scope %q is not allowed for this client", sc))
			}
		}
	}
	// A client may be allowed more scopes than one token can carry; it must
	// then ask for a subset.
	if n := len(strings.Join(scopes, " ")); n > events.MaxScopeLen {
		return nil, badRequest("invalid_scope", fmt.Sprintf("the scope is %d bytes; a token carries at most %d, so request fewer scopes", n, events.MaxScopeLen))
	}
	return scopes, nil
}

// checkScopeSyntax holds a scope parameter to RFC 6749 3.3: scope tokens of
// %x21 / %x23-5B / %x5D-7E separated by single spaces. The tokens are
// checked here, at the HTTP edge, and not in events.CanonicalScopes, which
// also reads stored events.
func checkScopeSyntax(raw string) error {
	for _, tok := range strings.Split(raw, " ") {
		if tok == "" {
			return badRequest("invalid_scope", "scope tokens must be separated by single spaces, with none before or after")
		}
		for i := 0; i < len(tok); i++ {
			if c := tok[i]; c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
				return badRequest("invalid_scope", fmt.Sprintf("scope %q holds a character RFC 6749 section 3.3 does not allow", tok))
			}
		}
	}
	return nil
}

// tokenRequest is what the endpoint reads from an HTTP request before it
// looks anything up: the form and the client's claimed credentials.
type tokenRequest struct {
	form         url.Values
	clientID     string
	clientSecret string
	basic        bool // credentials came by HTTP Basic
}

// parseRequest validates everything about a token request that needs no
// database: method, content type, size, form syntax, and the client
// authentication method (RFC 6749 2.3.1: HTTP Basic with form-urlencoded id
// and secret, or client_secret_post, not both). Handler's guard has checked
// the transport.
func parseRequest(r *http.Request, maxBody int64) (tokenRequest, error) {
	var req tokenRequest
	if r.Method != http.MethodPost {
		return req, &oauthError{status: http.StatusMethodNotAllowed, code: "invalid_request", desc: "the token endpoint accepts POST only"}
	}
	form, err := readForm(r, maxBody)
	if err != nil {
		return req, err
	}
	req.form = form
	if r.Header.Get("Authorization") != "" {
		id, secret, ok := r.BasicAuth()
		if !ok {
			return req, invalidClient("the Authorization header is not HTTP Basic credentials")
		}
		// RFC 6749 3.2: a parameter sent without a value counts as omitted
		// (some stock clients send an empty client_id next to Basic).
		if form.Get("client_secret") != "" {
			return req, badRequest("invalid_request", "use one client authentication method, not two")
		}
		var err1, err2 error
		id, err1 = url.QueryUnescape(id)
		secret, err2 = url.QueryUnescape(secret)
		if err1 != nil || err2 != nil {
			return req, invalidClient("malformed Basic credentials")
		}
		// A client_id next to Basic credentials is harmless only if it names
		// the same client.
		if form.Get("client_id") != "" && form.Get("client_id") != id {
			return req, badRequest("invalid_request", "client_id does not match the Basic credentials")
		}
		if id == "" || secret == "" {
			return req, invalidClient("empty Basic credentials")
		}
		req.clientID, req.clientSecret, req.basic = id, secret, true
		return req, nil
	}
	id, secret := form.Get("client_id"), form.Get("client_secret")
	if id == "" || secret == "" {
		return req, invalidClient("client authentication is required")
	}
	req.clientID, req.clientSecret = id, secret
	return req, nil
}

// readForm parses an application/x-www-form-urlencoded body of bounded size.
func readForm(r *http.Request, maxBody int64) (url.Values, error) {
	const form = "application/x-www-form-urlencoded"
	// The bare type, as clients send it, needs no parsing (which allocates
	// a map of parameters); anything else goes through the parser.
	if ct := r.Header.Get("Content-Type"); ct != form {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != form {
			return nil, badRequest("invalid_request", "the body must be application/x-www-form-urlencoded")
		}
	}
	r.Body = http.MaxBytesReader(nil, r.Body, maxBody)
	if err := r.ParseForm(); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, &oauthError{status: http.StatusRequestEntityTooLarge, code: "invalid_request", desc: "the request body is too large"}
		}
		return nil, badRequest("invalid_request", "the body is not a valid form")
	}
	// RFC 6749 section 3.2: parameters must not repeat; section 2.3.1: no
	// credentials in the query string.
	for k, v := range r.PostForm {
		if len(v) > 1 {
			return nil, badRequest("invalid_request", "parameter "+k+" is repeated")
		}
	}
	if r.URL.RawQuery != "" {
		if q := r.URL.Query(); q.Has("client_secret") || q.Has("password") {
			return nil, badRequest("invalid_request", "credentials must not be sent in the query string")
		}
	}
	return r.PostForm, nil
}

// authenticate checks the claimed credentials against the registry.
func (s *Server) authenticate(ctx context.Context, req tokenRequest) (*clients.Client, error) {
	c, err := s.registry.Authenticate(ctx, req.clientID, req.clientSecret)
	if errors.Is(err, clients.ErrInvalidClient) {
		return nil, invalidClient("client authentication failed")
	}
	if err != nil {
		return nil, fmt.Errorf("authenticate client: %w", err)
	}
	return c, nil
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Serve runs the endpoint on addr until ctx is done; see ServeListener.
func (s *Server) Serve(ctx context.Context, addr string, grace time.Duration) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("issuer: listen: %w", err)
	}
	return s.ServeListener(ctx, ln, grace)
}

// ServeListener runs the endpoint on ln until ctx is done, then stops
// accepting and lets in-flight requests (and so their publishes and
// transactions) finish within grace; connections still busy after grace are
// closed. It returns nil after a clean stop.
func (s *Server) ServeListener(ctx context.Context, ln net.Listener, grace time.Duration) error {
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      15 * time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	if s.cfg.TLSCertFile != "" || s.cfg.TLSKeyFile != "" {
		certs, err := newCertReloader(s.cfg.TLSCertFile, s.cfg.TLSKeyFile, s.log, certCheckEvery)
		if err != nil {
			return fmt.Errorf("issuer: %w", err)
		}
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate}
	}
	stopWatch, err := s.WatchNotices()
	if err != nil {
		return fmt.Errorf("issuer: %w", err)
	}
	defer stopWatch()
	// Read before Serve starts: Serve writes srv.TLSConfig (HTTP/2 set-up).
	useTLS := srv.TLSConfig != nil
	errc := make(chan error, 1)
	go func() {
		if useTLS {
			errc <- srv.ServeTLS(ln, "", "")
			return
		}
		errc <- srv.Serve(ln)
	}()
	s.log.Info("issuer listening", "addr", ln.Addr().String(), "mode", s.cfg.Mode, "tls", useTLS,
		"require_tls", s.cfg.RequireTLS, "trusted_proxies", s.cfg.TrustedProxies.String(), "issuer_url", s.cfg.IssuerURL)
	select {
	case err := <-errc:
		return fmt.Errorf("issuer: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	err = srv.Shutdown(shutdownCtx)
	<-errc // Serve has returned ErrServerClosed
	if err != nil {
		_ = srv.Close()
		return fmt.Errorf("issuer shutdown: requests still running after %s: %w", grace, err)
	}
	s.log.Info("issuer stopped")
	return nil
}
