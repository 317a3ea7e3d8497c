package issuer

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/clients"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// accessTokenType is RFC 8693's token type identifier of an access token,
// the only kind this server exchanges and issues by exchange.
const accessTokenType = "urn:ietf:params:oauth:token-type:access_token"

// exchange answers an RFC 8693 token exchange: the successor of a live
// access token, for the same client, user and scope (per-request rotation).
//
// An access token has exactly one successor. The first exchange records its
// time (store.RecordExchange, a primary-key race); every exchange derives the
// successor from the presented token (which only its holder knows) and that
// time under the signing key, so every instance computes the same successor
// and JetStream's deduplication keeps one event for it. The successor has a
// higher stream sequence, so it becomes the key's ACTIVE token; the
// presented token stays valid (ROTATED, store.AccessStatus.Effective) until
// the batch window after the first answered exchange (an exchange whose
// caller went away before the answer starts nothing), and every exchange
// inside the window gets the same successor. An exchange after the window is
// refused and, unless RotationReuseKeeps, revokes the family: a token
// presented that late was replayed by someone who is not its holder. A
// caller that says it validated the token before (validatedParam, the
// resource middleware: it refuses a token past its window at validation)
// is only refused: its late exchange is a request that ran past the window,
// not a replay.
//
// Only the token's own client may exchange it: a token is never converted
// into another client's, and a refresh token is never exchanged.
func (s *Server) exchange(ctx context.Context, client *clients.Client, form url.Values) (*tokenResponse, error) {
	text, err := exchangeParams(form)
	if err != nil {
		return nil, err
	}
	c, err := s.cfg.Keys.Decode(text)
	if err != nil || c.Kind != tokens.Access {
		return nil, badRequest("invalid_grant", "the subject token is not a valid access token")
	}
	if c.Expired(time.Now()) {
		return nil, badRequest("invalid_grant", "the subject token has expired")
	}
	if c.ClientID != client.ID {
		return nil, badRequest("invalid_grant", "the subject token was issued to another client")
	}
	d := events.DigestOf(text)
	at, err := s.exchangeTime(ctx, d, c, form.Get(validatedParam) == "true")
	if err != nil {
		return nil, err
	}
	sp := spec{clientID: c.ClientID, subject: c.Subject, grant: tokens.GrantTokenExchange,
		scopes: events.CanonicalScopes(c.Scope), issuedAt: at.at, family: c.Family, derived: true}
	sp.accessNonce = s.cfg.Keys.Derive("exchange/access", []byte(text), []byte(at.at.Format(time.RFC3339Nano)))
	resp, err := s.mintSuccessor(ctx, sp)
	if err != nil {
		return nil, err
	}
	if !at.answered {
		// The window starts with the first answer a caller is still waiting
		// for. A caller that went away (a resource server whose client
		// cancelled) gets nothing, and the presented token lives on as if
		// never exchanged: a cancelled request never costs its token. The
		// successor is handed out only once the answer is recorded, so the
		// window always runs for a successor someone holds.
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("token exchange abandoned by its caller: %w", err)
		}
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.PublishTimeout)
		defer cancel()
		if err := store.MarkExchangeAnswered(uctx, s.db, d, s.rotationWindow(client)); err != nil {
			return nil, fmt.Errorf("record token exchange of family %s as answered: %w", c.Family, err)
		}
		// An answer cached before the exchange would outlive the window
		// that starts now.
		s.cache.invalidate([]events.Digest{d})
		s.metrics.exchanges.WithLabelValues("first").Inc()
	} else {
		s.metrics.exchanges.WithLabelValues("repeat").Inc()
	}
	return resp, nil
}

// rotationWindow is the batch window of client's tokens: its own when set
// (tokenpipe client rotation-window), else the issuer's. In async mode
// every exchange inside a window republishes the successor's event, and
// JetStream keeps it once only within its duplicate window; a client window
// not shorter than that is ignored for the issuer's, which the
// configuration check holds below it.
func (s *Server) rotationWindow(client *clients.Client) time.Duration {
	w := client.RotationWindow
	if w == nil {
		return s.cfg.RotationWindow
	}
	if s.cfg.Mode != ModeSync && s.cfg.Topology.Duplicates > 0 && *w >= s.cfg.Topology.Duplicates {
		return s.cfg.RotationWindow
	}
	return *w
}

// validatedParam, sent "true" by a caller that validated the subject token
// (introspection) while it was live and exchanges it after serving the
// request it came with.
const validatedParam = "tokenpipe_validated"

// exchangeParams checks an exchange request's parameters (RFC 8693 section
// 2.1) and returns the subject token. Delegation (actor_token) and other
// token types are not offered; scope, audience and resource may not ask for
// anything else than the subject token has.
func exchangeParams(form url.Values) (string, error) {
	text := form.Get("subject_token")
	if text == "" {
		return "", badRequest("invalid_request", "subject_token is required")
	}
	if form.Get("subject_token_type") != accessTokenType {
		return "", badRequest("invalid_request", "subject_token_type must be "+accessTokenType)
	}
	if t := form.Get("requested_token_type"); t != "" && t != accessTokenType {
		return "", badRequest("invalid_request", "requested_token_type must be "+accessTokenType)
	}
	if form.Get("actor_token") != "" || form.Get("actor_token_type") != "" {
		return "", badRequest("invalid_request", "delegation (actor_token) is not supported")
	}
	if form.Get("scope") != "" || form.Get("audience") != "" || form.Get("resource") != "" {
		return "", badRequest("invalid_target", "the successor has the subject token's scope and audience; omit scope, audience and resource")
	}
	return text, nil
}

// exchangeAt is an access token's first exchange, as this request sees it.
type exchangeAt struct {
	at       time.Time
	answered bool
}

// exchangeTime checks that the presented token is live and records its
// first exchange, or reads it. An exchange after the window is refused,
// and counts as reuse once the successor was handed out, unless the caller
// validated the token before (validated).
func (s *Server) exchangeTime(ctx context.Context, d events.Digest, c tokens.Claims, validated bool) (exchangeAt, error) {
	st, err := s.accessStatus(ctx, d, c)
	if err != nil {
		return exchangeAt{}, err
	}
	if !st.Live() {
		if st.Exchanged && !st.WindowOpen {
			return exchangeAt{}, s.refuseLateExchange(ctx, c, validated)
		}
		s.metrics.exchanges.WithLabelValues("refused").Inc()
		return exchangeAt{}, badRequest("invalid_grant", "the subject token is not active")
	}
	// As with refresh: a removed user's session does not slide on.
	exists, err := store.PrincipalExists(ctx, s.db, c.ClientID, c.Subject, c.IssuedAt.Add(maxClockSkew+s.cfg.CoalesceWindow))
	if err != nil {
		return exchangeAt{}, err
	}
	if !exists {
		s.metrics.exchanges.WithLabelValues("refused").Inc()
		return exchangeAt{}, badRequest("invalid_grant", "the resource owner no longer exists")
	}
	at, first, err := store.RecordExchange(ctx, s.db, d, c.ExpiresAt)
	if err != nil {
		return exchangeAt{}, err
	}
	if first {
		return exchangeAt{at: at}, nil
	}
	x, _, err := store.ReadExchange(ctx, s.db, d)
	if err != nil {
		return exchangeAt{}, err
	}
	if x.Closed {
		return exchangeAt{}, s.refuseLateExchange(ctx, c, validated)
	}
	return exchangeAt{at: x.At, answered: x.Answered}, nil
}

// refuseLateExchange answers an exchange after the batch window. The
// successor was handed out (the window starts with the answer), so the
// presented token is someone's copy of a token its holder has moved on
// from: unless configured otherwise its family is revoked, successors
// included. A token its caller validated inside the window (validated) is
// not a replay but a request that outlasted the window: refused only.
func (s *Server) refuseLateExchange(ctx context.Context, c tokens.Claims, validated bool) error {
	if s.cfg.RotationReuseKeeps || validated {
		s.metrics.exchanges.WithLabelValues("refused").Inc()
		return badRequest("invalid_grant", "the subject token was already exchanged")
	}
	s.metrics.exchanges.WithLabelValues("reuse").Inc()
	res, err := store.RevokeFamily(ctx, s.db, c.Family, store.ReasonReuse)
	if err != nil {
		return fmt.Errorf("revoke family after exchange reuse: %w", err)
	}
	s.notify(res, &c.Family, store.ReasonReuse)
	s.log.Warn("access token exchanged after its batch window; family revoked",
		"client_id", c.ClientID, "family", c.Family.String(), "rows_revoked", len(res.Digests))
	return badRequest("invalid_grant", "the subject token was already exchanged")
}

// mintSuccessor records the successor, derived the same by every exchange
// inside the window. Recorded before, it is handed out again only while it
// is live; the answer says whether it was exchanged itself meanwhile.
func (s *Server) mintSuccessor(ctx context.Context, sp spec) (*tokenResponse, error) {
	m, err := s.build(sp, time.Now())
	if err != nil {
		return nil, err
	}
	seen, _, err := s.record(ctx, m.event)
	if err != nil {
		return nil, err
	}
	m.resp.IssuedTokenType = accessTokenType
	if !seen {
		s.metrics.issued.WithLabelValues(sp.grant).Inc()
		return m.resp, nil
	}
	st, err := s.accessStatus(ctx, m.event.TokenDigest, m.access)
	if err != nil {
		return nil, err
	}
	if !st.Live() {
		// Revoked, or another authorization (a sign-in elsewhere) took the
		// key: the presented token is dead with it.
		s.metrics.exchanges.WithLabelValues("refused").Inc()
		return nil, badRequest("invalid_grant", "the subject token is no longer active")
	}
	m.resp.SuccessorExchanged = st.Exchanged
	if st.ValidUntil != nil {
		m.resp.ExpiresIn = expiresIn(*st.ValidUntil, time.Now())
	}
	s.metrics.issued.WithLabelValues(sp.grant).Inc()
	return m.resp, nil
}
