// Package issuer is the stateless OAuth2 token endpoint (RFC 6749). It mints
// a token, publishes its TokenIssued event to JetStream, and answers the
// client only once JetStream has acknowledged the event, so a token a client
// holds is never lost. Only SHA-256 digests of tokens leave the process.
package issuer

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/clients"
	"github.com/tokenpipe/tokenpipe/events"
)

// Persistence modes.
const (
	ModeAsync = "async" // publish to JetStream, answer after its ack
	ModeSync  = "sync"  // write the row inside the request
)

// Config tunes the issuer.
type Config struct {
	Mode                string
	TokenTTL            time.Duration
	RefreshTTL          time.Duration
	PublishTimeout      time.Duration
	SyncConflictRetries int
	Instance            string
	MaxBodyBytes        int64
	RequireTLS          bool
	Topology            events.Topology
}

// Server answers POST /oauth2/token.
type Server struct {
	cfg      Config
	registry *clients.Registry
	nc       *nats.Conn // nil in sync mode
	js       jetstream.JetStream
	db       *pgxpool.Pool
	log      *slog.Logger
	metrics  *Metrics
}

// New returns a token endpoint. In async mode js must have been created with
// jetstream.WithPublishAsyncMaxPending so in-flight publishes are bounded;
// nc and js may be nil in sync mode.
func New(cfg Config, registry *clients.Registry, nc *nats.Conn, js jetstream.JetStream, db *pgxpool.Pool, log *slog.Logger, m *Metrics) *Server {
	return &Server{cfg: cfg, registry: registry, nc: nc, js: js, db: db, log: log, metrics: m}
}

// Handler routes the token endpoint.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/oauth2/token", s.token)
	return s.metrics.instrument(mux)
}

// oauthError is an RFC 6749 section 5.2 error.
type oauthError struct {
	status int
	code   string
	desc   string
}

func (e *oauthError) Error() string { return e.code + ": " + e.desc }

func badRequest(code, desc string) *oauthError {
	return &oauthError{status: http.StatusBadRequest, code: code, desc: desc}
}

var errUnavailable = &oauthError{status: http.StatusServiceUnavailable, code: "temporarily_unavailable",
	desc: "the token could not be recorded; retry shortly"}

type tokenResponse struct {
	AccessToken  string `json:"access_token"`
	TokenType    string `json:"token_type"`
	ExpiresIn    int64  `json:"expires_in"`
	Scope        string `json:"scope,omitempty"`
	RefreshToken string `json:"refresh_token,omitempty"`
}

func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	resp, basic, err := s.issue(r)
	if err != nil {
		var oe *oauthError
		if !errors.As(err, &oe) {
			s.log.Error("token request failed", "err", err)
			oe = errUnavailable
		}
		if oe.status == http.StatusMethodNotAllowed {
			w.Header().Set("Allow", http.MethodPost)
		}
		if oe.status == http.StatusUnauthorized && basic {
			w.Header().Set("WWW-Authenticate", `Basic realm="tokenpipe"`)
		}
		if oe.status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", "1")
		}
		writeJSON(w, oe.status, map[string]string{"error": oe.code, "error_description": oe.desc})
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// issue validates the request completely before minting anything, so bad
// input never produces an event or a row.
func (s *Server) issue(r *http.Request) (*tokenResponse, bool, error) {
	req, err := parseRequest(r, s.cfg.MaxBodyBytes, s.cfg.RequireTLS)
	if err != nil {
		return nil, req.basic, err
	}
	form, basic := req.form, req.basic
	client, err := s.authenticate(r.Context(), req)
	if err != nil {
		return nil, basic, err
	}
	grant := form.Get("grant_type")
	var subject string
	switch grant {
	case "":
		return nil, basic, badRequest("invalid_request", "grant_type is required")
	case "client_credentials":
		subject = client.ID
	case "password":
		user, pass := form.Get("username"), form.Get("password")
		if user == "" || pass == "" {
			return nil, basic, badRequest("invalid_request", "username and password are required")
		}
		if !client.Allows(grant) {
			return nil, basic, badRequest("unauthorized_client", "this client may not use the password grant")
		}
		if err := s.registry.VerifyUser(r.Context(), user, pass); err != nil {
			if errors.Is(err, clients.ErrInvalidGrant) {
				return nil, basic, badRequest("invalid_grant", "the resource owner credentials are invalid")
			}
			return nil, basic, err
		}
		subject = user
	default:
		return nil, basic, badRequest("unsupported_grant_type", "supported grant types: client_credentials, password")
	}
	if !client.Allows(grant) {
		return nil, basic, badRequest("unauthorized_client", "this client may not use the "+grant+" grant")
	}
	scopes := client.Scopes
	if raw, ok := form["scope"]; ok {
		// An absent scope gets the client's full set; a present one must be
		// a subset of it.
		scopes = events.CanonicalScopes(raw[0])
		for _, sc := range scopes {
			if !client.AllowsScope(sc) {
				return nil, basic, badRequest("invalid_scope", fmt.Sprintf("scope %q is not allowed for this client", sc))
			}
		}
	}
	resp, err := s.mint(r.Context(), client.ID, subject, grant, scopes)
	return resp, basic, err
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
// database: method, transport, content type, size, form syntax, and the
// client authentication method (RFC 6749 2.3.1: HTTP Basic with
// form-urlencoded id and secret, or client_secret_post, not both).
func parseRequest(r *http.Request, maxBody int64, requireTLS bool) (tokenRequest, error) {
	var req tokenRequest
	if r.Method != http.MethodPost {
		return req, &oauthError{status: http.StatusMethodNotAllowed, code: "invalid_request", desc: "the token endpoint accepts POST only"}
	}
	if requireTLS && r.TLS == nil && !strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https") {
		return req, badRequest("invalid_request", "the token endpoint requires TLS")
	}
	form, err := readForm(r, maxBody)
	if err != nil {
		return req, err
	}
	req.form = form
	id, secret, basic := r.BasicAuth()
	req.basic = basic
	if basic {
		if form.Has("client_secret") {
			return req, badRequest("invalid_request", "use one client authentication method, not two")
		}
		var err1, err2 error
		id, err1 = url.QueryUnescape(id)
		secret, err2 = url.QueryUnescape(secret)
		if err1 != nil || err2 != nil {
			return req, badRequest("invalid_request", "malformed Basic credentials")
		}
	} else {
		id, secret = form.Get("client_id"), form.Get("client_secret")
	}
	if id == "" || secret == "" {
		return req, &oauthError{status: http.StatusUnauthorized, code: "invalid_client", desc: "client authentication is required"}
	}
	req.clientID, req.clientSecret = id, secret
	return req, nil
}

// readForm parses an application/x-www-form-urlencoded body of bounded size.
func readForm(r *http.Request, maxBody int64) (url.Values, error) {
	ct, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || ct != "application/x-www-form-urlencoded" {
		return nil, badRequest("invalid_request", "the body must be application/x-www-form-urlencoded")
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
	if r.URL.Query().Has("client_secret") || r.URL.Query().Has("password") {
		return nil, badRequest("invalid_request", "credentials must not be sent in the query string")
	}
	return r.PostForm, nil
}

// authenticate checks the claimed credentials against the registry.
func (s *Server) authenticate(ctx context.Context, req tokenRequest) (*clients.Client, error) {
	c, err := s.registry.Authenticate(ctx, req.clientID, req.clientSecret)
	if errors.Is(err, clients.ErrInvalidClient) {
		return nil, &oauthError{status: http.StatusUnauthorized, code: "invalid_client", desc: "client authentication failed"}
	}
	return c, err
}

// newToken returns 256 random bits, base64url encoded.
func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

func (s *Server) mint(ctx context.Context, clientID, subject, grant string, scopes []string) (*tokenResponse, error) {
	access, err := newToken()
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	ev := &events.TokenIssued{
		TokenDigest: events.DigestOf(access), ClientID: clientID, Subject: subject, Scopes: scopes,
		GrantType: grant, IssuedAt: now, ExpiresAt: now.Add(s.cfg.TokenTTL), Instance: s.cfg.Instance,
	}
	resp := &tokenResponse{AccessToken: access, TokenType: "Bearer", ExpiresIn: int64(s.cfg.TokenTTL / time.Second), Scope: ev.Scope()}
	if grant == "password" {
		refresh, err := newToken()
		if err != nil {
			return nil, err
		}
		d := events.DigestOf(refresh)
		ev.RefreshDigest = &d
		resp.RefreshToken = refresh
	}
	if s.cfg.Mode == ModeSync {
		err = s.persistSync(ctx, ev)
	} else {
		err = s.publish(ctx, ev)
	}
	if err != nil {
		return nil, err
	}
	s.metrics.issued.WithLabelValues(grant).Inc()
	return resp, nil
}

// publish hands the event to JetStream and waits for its acknowledgement.
// Any failure means the token is never shown to the client.
func (s *Server) publish(ctx context.Context, ev *events.TokenIssued) error {
	body, err := events.EncodeTokenIssued(ev)
	if err != nil {
		return fmt.Errorf("encode event: %w", err)
	}
	if s.nc != nil && !s.nc.IsConnected() {
		s.metrics.publishErrors.WithLabelValues("disconnected").Inc()
		return errUnavailable
	}
	start := time.Now()
	f, err := s.js.PublishAsync(s.cfg.Topology.IssuedSubject(), body,
		jetstream.WithMsgID(ev.TokenDigest.String()),
		jetstream.WithExpectStream(s.cfg.Topology.Stream),
		jetstream.WithStallWait(s.cfg.PublishTimeout))
	if err != nil {
		s.metrics.publishErrors.WithLabelValues("stalled").Inc()
		s.log.Warn("publish refused", "err", err)
		return errUnavailable
	}
	timer := time.NewTimer(s.cfg.PublishTimeout - time.Since(start))
	defer timer.Stop()
	select {
	case <-f.Ok():
		s.metrics.publishSeconds.Observe(time.Since(start).Seconds())
		return nil
	case err := <-f.Err():
		s.metrics.publishErrors.WithLabelValues("nack").Inc()
		s.log.Warn("publish failed", "err", err)
	case <-timer.C:
		s.metrics.publishErrors.WithLabelValues("timeout").Inc()
		s.log.Warn("publish not acknowledged in time", "timeout", s.cfg.PublishTimeout)
	case <-ctx.Done():
		s.metrics.publishErrors.WithLabelValues("client_gone").Inc()
	}
	return errUnavailable
}

// persistSync writes the row in the request: deactivate the key's ACTIVE row
// and insert the new one in one transaction, retrying when a concurrent
// request for the same key wins the race (WSO2's synchronous mode).
func (s *Server) persistSync(ctx context.Context, ev *events.TokenIssued) error {
	var refresh []byte
	if ev.RefreshDigest != nil {
		refresh = ev.RefreshDigest[:]
	}
	var last error
	for attempt := 0; attempt <= s.cfg.SyncConflictRetries; attempt++ {
		err := pgx.BeginFunc(ctx, s.db, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `UPDATE tokens SET state = 'INACTIVE', state_changed_at = now()
				WHERE client_id = $1 AND subject = $2 AND scope = $3 AND state = 'ACTIVE'`,
				ev.ClientID, ev.Subject, ev.Scope()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
				grant_type, issued_at, expires_at, instance) VALUES ($1, $2, $3, $4, $5, 'ACTIVE', $6, $7, $8, $9)`,
				ev.TokenDigest[:], refresh, ev.ClientID, ev.Subject, ev.Scope(), ev.GrantType, ev.IssuedAt, ev.ExpiresAt, ev.Instance)
			return err
		})
		if err == nil {
			return nil
		}
		last = err
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || (pe.Code != "23505" && pe.Code != "40001" && pe.Code != "40P01") {
			break
		}
		s.metrics.syncRetries.Inc()
	}
	s.log.Error("sync persistence failed", "err", last, "retries", s.cfg.SyncConflictRetries)
	return errUnavailable
}

// Serve runs the endpoint on addr until ctx is done, then stops accepting,
// finishes in-flight requests (and so their publishes) within grace.
func (s *Server) Serve(ctx context.Context, addr string, grace time.Duration) error {
	srv := &http.Server{
		Addr: addr, Handler: s.Handler(),
		ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 15 * time.Second,
		MaxHeaderBytes: 16 << 10,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	s.log.Info("issuer listening", "addr", addr, "mode", s.cfg.Mode)
	select {
	case err := <-errc:
		return fmt.Errorf("issuer: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("issuer shutdown: %w", err)
	}
	return nil
}
