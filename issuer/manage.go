package issuer

import (
	"context"
	"crypto/subtle"
	"errors"
	"net/http"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/grants"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// manageRoutes adds the management API.
//
// /account/... is for users, authenticated with their own username and
// password (HTTP Basic): list the applications holding live tokens for them
// and remove one, which revokes all its tokens for the user, queued ones
// included. /admin/... is for other systems acting for users or operators,
// with Authorization: Bearer TOKENPIPE_ADMIN_TOKEN; it is off when no admin
// token is configured. No answer ever holds token plaintext.
func (s *Server) manageRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /account/applications", s.asUser(func(w http.ResponseWriter, r *http.Request, user string) {
		s.listApplications(w, r, user)
	}))
	mux.HandleFunc("DELETE /account/applications/{client_id}", s.asUser(func(w http.ResponseWriter, r *http.Request, user string) {
		if validNames(w, r.PathValue("client_id"), "") {
			s.revokeGrant(w, r, r.PathValue("client_id"), user, store.ReasonUser)
		}
	}))
	mux.HandleFunc("GET /admin/users/{user}/applications", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		if validNames(w, "", r.PathValue("user")) {
			s.listApplications(w, r, r.PathValue("user"))
		}
	}))
	mux.HandleFunc("DELETE /admin/users/{user}/applications/{client_id}", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		if validNames(w, r.PathValue("client_id"), r.PathValue("user")) {
			s.revokeGrant(w, r, r.PathValue("client_id"), r.PathValue("user"), store.ReasonAdmin)
		}
	}))
	mux.HandleFunc("GET /admin/clients/{client_id}/tokens", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		if validNames(w, r.PathValue("client_id"), r.URL.Query().Get("sub")) {
			s.listClientTokens(w, r)
		}
	}))
	mux.HandleFunc("PUT /admin/clients/{client_id}/grants/{grant}", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		s.setGrant(w, r, true)
	}))
	mux.HandleFunc("DELETE /admin/clients/{client_id}/grants/{grant}", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		s.setGrant(w, r, false)
	}))
	mux.HandleFunc("DELETE /admin/clients/{client_id}/tokens", s.asAdmin(func(w http.ResponseWriter, r *http.Request) {
		// ?sub=U narrows the revocation to one user.
		if validNames(w, r.PathValue("client_id"), r.URL.Query().Get("sub")) {
			s.revokeClientTokens(w, r, r.PathValue("client_id"), r.URL.Query().Get("sub"))
		}
	}))
}

// validNames checks a client id and a subject taken from a URL (either may
// be "" when the route has none) before any database work, and answers 400
// if one could not be registered: such names would otherwise reach Postgres
// at any length, and a revocation would store them.
func validNames(w http.ResponseWriter, client, sub string) bool {
	var err error
	if client != "" {
		err = clients.ValidClientID(client)
	}
	if err == nil && sub != "" {
		err = clients.ValidUsername(sub)
	}
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError("invalid_request", err.Error()))
		return false
	}
	return true
}

func (s *Server) asUser(h func(http.ResponseWriter, *http.Request, string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		user, pass, ok := r.BasicAuth()
		if !ok || user == "" || pass == "" {
			w.Header().Set("WWW-Authenticate", `Basic realm="tokenpipe account"`)
			writeJSON(w, http.StatusUnauthorized, apiError("unauthorized", "sign in with your username and password (HTTP Basic)"))
			return
		}
		err := s.checkPassword(r, "account", user, pass)
		if errors.Is(err, clients.ErrInvalidGrant) {
			w.Header().Set("WWW-Authenticate", `Basic realm="tokenpipe account"`)
			writeJSON(w, http.StatusUnauthorized, apiError("unauthorized", "the username or password is wrong"))
			return
		}
		if err != nil {
			s.writeError(w, err)
			return
		}
		h(w, r, user)
	}
}

func (s *Server) asAdmin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.AdminToken == "" {
			http.NotFound(w, r)
			return
		}
		got, ok := bearerToken(r)
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(s.cfg.AdminToken)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tokenpipe admin"`)
			writeJSON(w, http.StatusUnauthorized, apiError("unauthorized", "a valid admin bearer token is required"))
			return
		}
		h(w, r)
	}
}

// bearerToken reads Authorization: Bearer TOKEN. The scheme name is
// case-insensitive (RFC 9110 11.1) and may be followed by several spaces
// (RFC 6750 2.1: 1*SP).
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimLeft(token, " ")
	return token, token != ""
}

func apiError(code, desc string) map[string]string {
	return map[string]string{"error": code, "error_description": desc}
}

func (s *Server) listApplications(w http.ResponseWriter, r *http.Request, user string) {
	apps, err := grants.Applications(r.Context(), s.db, user)
	if err != nil {
		s.writeError(w, err)
		return
	}
	if apps == nil {
		apps = []grants.Application{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"sub": user, "applications": apps})
}

func (s *Server) listClientTokens(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := grants.Filter{Subject: q.Get("sub"), State: strings.ToUpper(q.Get("state"))}
	switch f.State {
	case "", "ACTIVE", "INACTIVE", "REVOKED", "EXPIRED":
	default:
		writeJSON(w, http.StatusBadRequest, apiError("invalid_request", "state must be ACTIVE, INACTIVE, REVOKED or EXPIRED"))
		return
	}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 10000 {
			writeJSON(w, http.StatusBadRequest, apiError("invalid_request", "limit must be between 1 and 10000"))
			return
		}
		f.Limit = n
	}
	toks, err := grants.ClientTokens(r.Context(), s.db, r.PathValue("client_id"), f)
	if err != nil {
		s.writeError(w, err)
		return
	}
	if toks == nil {
		toks = []grants.Token{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"client_id": r.PathValue("client_id"), "tokens": toks})
}

// revokeGrant revokes a user's tokens for a client and answers with how
// many stored tokens changed, or 404 if the user has no such application.
func (s *Server) revokeGrant(w http.ResponseWriter, r *http.Request, client, user, reason string) {
	res, err := grants.RevokeApplication(r.Context(), s.db, s.grantStream(), s.cfg.Topology.Stream, client, user, reason)
	s.answerRevocation(w, res, err, client, user, reason)
}

// revokeClientTokens revokes a client's tokens of one subject (sub, which
// may be the client itself) or, with sub "", of every subject.
func (s *Server) revokeClientTokens(w http.ResponseWriter, r *http.Request, client, sub string) {
	res, err := grants.RevokeKnown(r.Context(), s.db, s.grantStream(), s.cfg.Topology.Stream, client, sub, store.ReasonAdmin)
	s.answerRevocation(w, res, err, client, sub, store.ReasonAdmin)
}

// grantStream is the stream whose last sequence bounds a grant revocation,
// nil in sync mode, where every token already has its row.
func (s *Server) grantStream() jetstream.JetStream {
	if s.cfg.Mode == ModeSync {
		return nil
	}
	return s.js
}

func (s *Server) answerRevocation(w http.ResponseWriter, res store.Revocation, err error, client, user, reason string) {
	if errors.Is(err, grants.ErrNoApplication) {
		writeJSON(w, http.StatusNotFound, apiError("not_found", "no such application: the client is unknown, or its tokens are not this user's"))
		return
	}
	if err != nil {
		s.writeError(w, err)
		return
	}
	s.grantRevoked(res, client, user, reason)
	writeJSON(w, http.StatusOK, map[string]any{"client_id": client, "sub": user, "revoked_tokens": len(res.Digests), "revoked_families": res.Families})
}

// grantRevoked counts, announces (so every instance's introspection cache
// drops the tokens) and logs a committed grant revocation.
func (s *Server) grantRevoked(res store.Revocation, client, user, reason string) {
	s.metrics.revoked.WithLabelValues("grant").Inc()
	s.notify(res, nil, reason)
	s.log.Info("grant revoked", "client_id", client, "sub", user, "reason", reason, "rows_revoked", len(res.Digests))
}

// setGrant turns one grant of a client on or off: PUT allows it, DELETE
// withdraws it. This issuer applies it at once; others within their client
// cache TTL.
func (s *Server) setGrant(w http.ResponseWriter, r *http.Request, allow bool) {
	client, grant := r.PathValue("client_id"), r.PathValue("grant")
	if !validNames(w, client, "") {
		return
	}
	if !clients.KnownGrant(grant) {
		writeJSON(w, http.StatusBadRequest, apiError("invalid_request", "grant must be one of "+clients.GrantNames()))
		return
	}
	err := s.changeGrant(r.Context(), client, grant, allow, "admin API")
	if errors.Is(err, clients.ErrNotFound) {
		writeJSON(w, http.StatusNotFound, apiError("not_found", "no such client"))
		return
	}
	if err != nil {
		s.writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"client_id": client, "grant": grant, "allowed": allow})
}

// changeGrant stores a grant change and drops the client from this
// issuer's cache, so the change applies here at once.
func (s *Server) changeGrant(ctx context.Context, client, grant string, allow bool, by string) error {
	if err := clients.SetGrant(ctx, s.db, client, grant, allow); err != nil {
		return err
	}
	s.registry.Forget(client)
	s.log.Info("client grant changed", "client_id", client, "grant", grant, "allowed", allow, "by", by)
	return nil
}
