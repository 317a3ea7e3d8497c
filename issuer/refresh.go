package issuer

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/clients"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/revoke"
	"github.com/tokenpipe/tokenpipe/tokens"
)

// refresh redeems a refresh token (RFC 6749 section 6) with rotation: the
// answer is a new access and refresh token, and the old refresh token stops
// working once the grace window after its first redemption has passed.
//
// Redemptions inside the grace window all receive the same new pair, on any
// instance, with no state shared but one row: the first redemption's time in
// refresh_rotations. The new pair is derived from the presented refresh
// token (which only its holder knows) and that time under the signing key,
// so every instance computes the same pair; JetStream's deduplication then
// keeps one event for it. A redemption after the window is reuse (a stolen
// or replayed token, in the OAuth 2.0 security BCP's terms): it is refused
// and the whole family is revoked.
func (s *Server) refresh(ctx context.Context, client *clients.Client, form url.Values) (*tokenResponse, error) {
	text := form.Get("refresh_token")
	if text == "" {
		return nil, badRequest("invalid_request", "refresh_token is required")
	}
	c, err := s.cfg.Keys.Decode(text)
	if err != nil || c.Kind != tokens.Refresh {
		return nil, badRequest("invalid_grant", "the refresh token is invalid")
	}
	if c.Expired(time.Now()) {
		return nil, badRequest("invalid_grant", "the refresh token has expired")
	}
	if c.ClientID != client.ID {
		return nil, badRequest("invalid_grant", "the refresh token was issued to another client")
	}
	scopes, err := refreshScopes(client, c, form.Get("scope"))
	if err != nil {
		return nil, err
	}
	d := events.DigestOf(text)
	st, err := s.refreshState(ctx, d, c)
	if err != nil {
		return nil, err
	}
	if st.revoked {
		return nil, badRequest("invalid_grant", "the refresh token was revoked")
	}
	rotatedAt, reuse, err := s.rotate(ctx, d, c)
	if err != nil {
		return nil, err
	}
	if reuse {
		s.metrics.refreshReuse.Inc()
		res, err := revoke.Family(ctx, s.db, c.Family, revoke.ReasonReuse)
		if err != nil {
			return nil, fmt.Errorf("revoke family after reuse: %w", err)
		}
		s.notify(res, &c.Family, revoke.ReasonReuse)
		s.log.Warn("refresh token reused after its grace window; family revoked",
			"client_id", c.ClientID, "family", c.Family.String(), "rows_revoked", len(res.Digests))
		return nil, badRequest("invalid_grant", "the refresh token was already used")
	}
	sp := spec{clientID: c.ClientID, subject: c.Subject, grant: "refresh_token", scopes: scopes,
		refresh: true, issuedAt: rotatedAt, family: c.Family, derived: true}
	parts := [][]byte{[]byte(text), []byte(events.JoinScopes(scopes))}
	sp.accessNonce = s.cfg.Keys.Derive("refresh/access", parts...)
	sp.refreshNonce = s.cfg.Keys.Derive("refresh/refresh", parts...)
	return s.mint(ctx, sp)
}

// refreshScopes is the scope of the new pair: the original one, or a subset
// of it the client asks for (RFC 6749 section 6), and in either case no more
// than the client's registration allows today.
func refreshScopes(client *clients.Client, c tokens.Claims, raw string) ([]string, error) {
	granted := events.CanonicalScopes(c.Scope)
	scopes := granted
	if raw != "" {
		if err := checkScopeSyntax(raw); err != nil {
			return nil, err
		}
		scopes = events.CanonicalScopes(raw)
		for _, sc := range scopes {
			if !slices.Contains(granted, sc) {
				return nil, badRequest("invalid_scope", fmt.Sprintf("scope %q was not granted to the refresh token", sc))
			}
		}
	}
	for _, sc := range scopes {
		if !client.AllowsScope(sc) {
			return nil, badRequest("invalid_scope", fmt.Sprintf("scope %q is no longer allowed for this client", sc))
		}
	}
	return scopes, nil
}

// rotate records the first redemption of a refresh token, or reads it. It
// reports reuse when the first redemption is older than the grace window.
// The database's clock decides, so issuer clocks need not agree.
//
// Two statements on purpose: the INSERT waits for a concurrent first
// redemption to commit, and only a later statement's snapshot can see it.
func (s *Server) rotate(ctx context.Context, d events.Digest, c tokens.Claims) (time.Time, bool, error) {
	var at time.Time
	err := s.db.QueryRow(ctx, `INSERT INTO refresh_rotations (refresh_digest, rotated_at, expires_at)
		VALUES ($1, date_trunc('milliseconds', clock_timestamp()), $2)
		ON CONFLICT DO NOTHING RETURNING rotated_at`, d[:], c.ExpiresAt).Scan(&at)
	if err == nil {
		return at.UTC(), false, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return at, false, fmt.Errorf("record refresh rotation: %w", err)
	}
	var reuse bool
	err = s.db.QueryRow(ctx, `SELECT rotated_at, clock_timestamp() - rotated_at > $2
		FROM refresh_rotations WHERE refresh_digest = $1`, d[:], s.cfg.RefreshGrace).Scan(&at, &reuse)
	if err != nil {
		return at, false, fmt.Errorf("read refresh rotation: %w", err)
	}
	return at.UTC(), reuse, nil
}
