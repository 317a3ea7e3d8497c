package issuer

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// revoke answers POST /oauth2/revoke (RFC 7009). Revoking an access token
// revokes that token; revoking a refresh token revokes its family: every
// token rotated from the same authorization, as section 2.1 recommends.
// The revocation is committed to Postgres before the answer, and wins over
// a TokenIssued event still in the queue.
func (s *Server) revoke(w http.ResponseWriter, r *http.Request) {
	client, text, ok := s.tokenRequest(w, r)
	if !ok {
		return
	}
	c, err := s.cfg.Keys.Decode(text)
	if err != nil || c.Expired(time.Now()) {
		// Section 2.2: an invalid token is not an error; there is nothing
		// left to revoke.
		writeRevoked(w)
		return
	}
	if c.ClientID != client.ID {
		s.writeError(w, badRequest("unauthorized_client", "the token was not issued to this client"))
		return
	}
	var res store.Revocation
	var family *tokens.Family
	if c.Kind == tokens.Refresh {
		family = &c.Family
		res, err = store.RevokeFamily(r.Context(), s.db, c.Family, store.ReasonClient)
	} else {
		res, err = store.RevokeToken(r.Context(), s.db, events.DigestOf(text), c)
	}
	if err != nil {
		s.writeError(w, fmt.Errorf("revoke %s: %w", c.Kind, err))
		return
	}
	s.metrics.revoked.WithLabelValues(c.Kind.String()).Inc()
	s.notify(res, family, store.ReasonClient)
	writeRevoked(w)
}

// tokenRequest reads a client-authenticated request about a token (RFC 7009,
// RFC 7662): the same transport, form and authentication rules as the token
// endpoint, and a required token parameter. On failure it has answered.
func (s *Server) tokenRequest(w http.ResponseWriter, r *http.Request) (*clients.Client, string, bool) {
	req, err := parseRequest(r, s.cfg.MaxBodyBytes)
	var client *clients.Client
	if err == nil {
		client, err = s.authenticate(r.Context(), req)
	}
	if err == nil && req.form.Get("token") == "" {
		err = badRequest("invalid_request", "token is required")
	}
	if err != nil {
		s.writeError(w, err)
		return nil, "", false
	}
	return client, req.form.Get("token"), true
}

func writeRevoked(w http.ResponseWriter) {
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
}

// notify drops revoked tokens from this instance's introspection cache and
// tells the other instances. Delivery to them is best effort (core NATS):
// the revocation is already committed, and their positive answers expire
// within the cache TTL in any case.
func (s *Server) notify(res store.Revocation, family *tokens.Family, reason string) {
	s.cache.invalidate(res.Digests)
	if s.nc == nil {
		return
	}
	n := store.Notice(res, reason)
	n.Family = family
	body, err := events.EncodeTokenRevoked(n)
	if err == nil {
		err = s.nc.Publish(s.cfg.Topology.RevokedSubject(), body)
	}
	if err != nil {
		s.log.Warn("revocation notice not sent; other instances rely on their cache TTL", "err", err)
	}
}

// WatchNotices subscribes to revocation and deactivation notices and drops
// the tokens they name from the introspection cache, until stop is called.
// ServeListener calls it; it needs a NATS connection (async mode).
func (s *Server) WatchNotices() (stop func(), err error) {
	if s.nc == nil {
		return func() {}, nil
	}
	var subs []*nats.Subscription
	stop = func() {
		for _, sub := range subs {
			_ = sub.Unsubscribe()
		}
	}
	for _, subject := range []string{s.cfg.Topology.RevokedSubject(), s.cfg.Topology.DeactivatedSubject()} {
		sub, err := s.nc.Subscribe(subject, s.onNotice)
		if err != nil {
			stop()
			return nil, fmt.Errorf("subscribe %s: %w", subject, err)
		}
		subs = append(subs, sub)
	}
	return stop, nil
}

func (s *Server) onNotice(m *nats.Msg) {
	if strings.HasSuffix(m.Subject, ".deactivated") {
		if n, err := events.DecodeTokenDeactivated(m.Data); err == nil {
			s.cache.invalidate([]events.Digest{n.TokenDigest})
		}
		return
	}
	if n, err := events.DecodeTokenRevoked(m.Data); err == nil {
		s.cache.invalidate(n.Digests)
	}
}

// metadata serves RFC 8414 authorization server metadata, so stock clients
// can discover the endpoints. The issuer identifier is configuration
// (IssuerURL), never the Host or X-Forwarded-Proto of the request, which a
// client controls. Only what is true is listed: there is no authorization
// endpoint, so no response type is supported (the member is required, and
// empty), and no JWKS, since tokens are opaque to clients.
func (s *Server) metadata(w http.ResponseWriter, r *http.Request) {
	if s.cfg.IssuerURL == "" {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeJSON(w, http.StatusMethodNotAllowed, apiError("invalid_request", "the metadata document answers GET and HEAD only"))
		return
	}
	base := strings.TrimSuffix(s.cfg.IssuerURL, "/")
	auth := []string{"client_secret_basic", "client_secret_post"}
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                        s.cfg.IssuerURL,
		"token_endpoint":                                base + "/oauth2/token",
		"revocation_endpoint":                           base + "/oauth2/revoke",
		"introspection_endpoint":                        base + "/oauth2/introspect",
		"grant_types_supported":                         []string{"client_credentials", "password", "refresh_token", tokens.GrantTokenExchange},
		"response_types_supported":                      []string{},
		"token_endpoint_auth_methods_supported":         auth,
		"revocation_endpoint_auth_methods_supported":    auth,
		"introspection_endpoint_auth_methods_supported": auth,
	})
}
