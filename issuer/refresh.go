package issuer

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// refresh redeems a refresh token (RFC 6749 section 6) with rotation: the
// answer is a new access and refresh token, and the old refresh token stops
// working once the grace window after its first answered redemption has
// passed.
//
// A refresh token has exactly one successor pair. The first redemption
// records its time and scope (store.RecordRotation); every redemption derives
// the pair from the presented refresh token (which only its holder knows),
// that time and that scope under the signing key, so every instance computes
// the same pair and JetStream's deduplication keeps one event for it. The
// rotation counts as a use only once its pair was recorded and could be
// handed out (answered_at): a redemption that ended in 503 can be retried.
// A redemption more than the grace window after the first answer is reuse
// (a stolen or replayed token, in the OAuth 2.0 security BCP's terms): it is
// refused and the whole family is revoked.
//
// The new refresh token keeps the presented one's scope and expiry: a
// narrowed scope applies to the access token only, and rotation never
// extends a family's lifetime. The user must still exist.
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
	if !st.userExists {
		return nil, badRequest("invalid_grant", "the resource owner no longer exists")
	}
	rot, err := s.rotate(ctx, d, c, scopes)
	if err != nil {
		return nil, err
	}
	if rot.reuse {
		return nil, s.refuseReuse(ctx, c)
	}
	sp := spec{clientID: c.ClientID, subject: c.Subject, grant: "refresh_token", scopes: rot.scopes,
		refresh: true, issuedAt: rot.at, family: c.Family, derived: true,
		refreshScope: c.Scope, refreshExpires: c.ExpiresAt}
	parts := [][]byte{[]byte(text), []byte(events.JoinScopes(rot.scopes))}
	sp.accessNonce = s.cfg.Keys.Derive("refresh/access", parts...)
	sp.refreshNonce = s.cfg.Keys.Derive("refresh/refresh", parts...)
	resp, err := s.mintRotation(ctx, sp)
	if err != nil {
		return nil, err
	}
	if !rot.answered {
		// The pair is handed out only once its use is recorded: a pair
		// handed out unrecorded would let the old refresh token be redeemed
		// again at any time without counting as reuse. The client's going
		// away must not stop the update either (a half-closed connection
		// still reads the answer). On failure the answer is 503 and a retry
		// gets the same pair.
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.PublishTimeout)
		defer cancel()
		if err := store.MarkRotationAnswered(uctx, s.db, d); err != nil {
			return nil, fmt.Errorf("record refresh rotation of family %s as answered: %w", c.Family, err)
		}
	}
	return resp, nil
}

// refuseReuse answers a redemption after the grace window: the token was
// stolen or replayed, so its whole family is revoked.
func (s *Server) refuseReuse(ctx context.Context, c tokens.Claims) error {
	s.metrics.refreshReuse.Inc()
	res, err := store.RevokeFamily(ctx, s.db, c.Family, store.ReasonReuse)
	if err != nil {
		return fmt.Errorf("revoke family after reuse: %w", err)
	}
	s.notify(res, &c.Family, store.ReasonReuse)
	s.log.Warn("refresh token reused after its grace window; family revoked",
		"client_id", c.ClientID, "family", c.Family.String(), "rows_revoked", len(res.Digests))
	return badRequest("invalid_grant", "the refresh token was already used")
}

// refreshScopes is the scope the client asks for: the original one, or a
// subset of it (RFC 6749 section 6), and in either case no more than the
// client's registration allows today.
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

// rotation is a refresh token's first redemption, as recorded.
type rotation struct {
	at       time.Time
	scopes   []string // the new access token's scope: the first redemption's
	answered bool     // the successor pair was recorded and could be handed out
	reuse    bool     // answered longer ago than the grace window
}

// rotate records the first redemption of a refresh token, or reads it. The
// database's clock decides, so issuer clocks need not agree.
//
// Two statements on purpose: the INSERT waits for a concurrent first
// redemption to commit, and only a later statement's snapshot can see it.
func (s *Server) rotate(ctx context.Context, d events.Digest, c tokens.Claims, scopes []string) (rotation, error) {
	rot := rotation{scopes: scopes}
	at, first, err := store.RecordRotation(ctx, s.db, d, c.ExpiresAt, events.JoinScopes(scopes))
	if err != nil {
		return rot, fmt.Errorf("record refresh rotation: %w", err)
	}
	if first {
		rot.at = at
		return rot, nil
	}
	rec, err := store.ReadRotation(ctx, s.db, d, s.cfg.RefreshGrace)
	if err != nil {
		return rot, fmt.Errorf("read refresh rotation: %w", err)
	}
	rot.at, rot.answered, rot.reuse = rec.At, rec.Answered, rec.Reuse
	scope := rec.Scope
	// Rows from before the scope was recorded derived the pair from the
	// requested scope, as this redemption then does.
	if scope != nil {
		rot.scopes = events.CanonicalScopes(*scope)
	}
	return rot, nil
}
