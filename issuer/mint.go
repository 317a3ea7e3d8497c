package issuer

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/revoke"
	"github.com/tokenpipe/tokenpipe/tokens"
)

// spec is what to mint: one access token and maybe a refresh token.
type spec struct {
	clientID, subject, grant string
	scopes                   []string
	refresh                  bool      // also mint a refresh token
	issuedAt                 time.Time // millisecond precision, as tokens carry it
	family                   tokens.Family
	accessNonce              [16]byte
	refreshNonce             [16]byte
	// derived: the nonces were derived, not drawn, so another request (on
	// any instance) may have minted the very same token before.
	derived bool
}

// randomize gives sp fresh random nonces (and family, unless it continues
// one), so the token is new whatever was minted before.
func (sp *spec) randomize(newFamily bool) error {
	parts := [][]byte{sp.accessNonce[:], sp.refreshNonce[:]}
	if newFamily {
		parts = append(parts, sp.family[:])
	}
	for _, p := range parts {
		if _, err := rand.Read(p); err != nil {
			return fmt.Errorf("generate token: %w", err)
		}
	}
	sp.derived = false
	return nil
}

// grantSpec is the spec for a client_credentials or password request. With a
// coalescing window, identical requests (same client, subject, scope, grant)
// inside one window derive the same token, so a multi-threaded client that
// asks N times at once holds one token, not N of which N-1 are deactivated a
// moment later. Instances agree without talking: the window is cut from the
// clock and the token from the shared key.
func (s *Server) grantSpec(clientID, subject, grant string, scopes []string, refresh bool, now time.Time) (spec, error) {
	sp := spec{clientID: clientID, subject: subject, grant: grant, scopes: scopes, refresh: refresh}
	w := s.cfg.CoalesceWindow.Milliseconds()
	if w <= 0 {
		sp.issuedAt = now.Truncate(time.Millisecond)
		return sp, sp.randomize(true)
	}
	window := now.UnixMilli() / w
	sp.issuedAt = time.UnixMilli(window * w).UTC()
	parts := [][]byte{[]byte(clientID), []byte(subject), []byte(events.JoinScopes(scopes)), []byte(grant),
		binary.BigEndian.AppendUint64(nil, uint64(window))}
	sp.accessNonce = s.cfg.Keys.Derive("coalesce/access", parts...)
	sp.refreshNonce = s.cfg.Keys.Derive("coalesce/refresh", parts...)
	sp.family = s.cfg.Keys.Derive("coalesce/family", parts...)
	sp.derived = true
	return sp, nil
}

// minted is a spec turned into token texts, claims and the event.
type minted struct {
	resp    *tokenResponse
	access  tokens.Claims
	event   *events.TokenIssued
	refresh string
}

func (s *Server) build(sp spec, now time.Time) (*minted, error) {
	scope := events.JoinScopes(sp.scopes)
	access := tokens.Claims{Kind: tokens.Access, Grant: sp.grant, ClientID: sp.clientID, Subject: sp.subject,
		Scope: scope, IssuedAt: sp.issuedAt, ExpiresAt: sp.issuedAt.Add(s.cfg.TokenTTL), Family: sp.family, Nonce: sp.accessNonce}
	text, err := s.cfg.Keys.Encode(access)
	if err != nil {
		return nil, err
	}
	family := sp.family
	m := &minted{access: access, event: &events.TokenIssued{
		TokenDigest: events.DigestOf(text), ClientID: sp.clientID, Subject: sp.subject, Scopes: sp.scopes,
		GrantType: sp.grant, IssuedAt: access.IssuedAt, ExpiresAt: access.ExpiresAt, Instance: s.cfg.Instance,
		FamilyID: &family,
	}}
	m.resp = &tokenResponse{AccessToken: text, TokenType: "Bearer", ExpiresIn: expiresIn(access.ExpiresAt, now), Scope: scope}
	if sp.refresh {
		rc := access
		rc.Kind, rc.ExpiresAt, rc.Nonce = tokens.Refresh, sp.issuedAt.Add(s.cfg.RefreshTTL), sp.refreshNonce
		rt, err := s.cfg.Keys.Encode(rc)
		if err != nil {
			return nil, err
		}
		d := events.DigestOf(rt)
		m.event.RefreshDigest, m.event.RefreshExpiresAt = &d, &rc.ExpiresAt
		m.resp.RefreshToken, m.refresh = rt, rt
	}
	return m, nil
}

// expiresIn is RFC 6749's expires_in: seconds left, rounded, at least 1.
func expiresIn(exp, now time.Time) int64 {
	return max(1, int64((exp.Sub(now)+time.Second/2)/time.Second))
}

// mint records the tokens of sp (publish, or write in sync mode) and
// returns the answer for the client.
//
// A derived token may have been handed out before. If it since was revoked
// or deactivated it must never be handed out again: then, and whenever that
// cannot be checked, the tokens are minted afresh with random values.
func (s *Server) mint(ctx context.Context, sp spec) (*tokenResponse, error) {
	now := time.Now()
	m, err := s.build(sp, now)
	if err != nil {
		return nil, err
	}
	seen, err := s.record(ctx, m.event)
	if errors.Is(err, errUnconfirmed) && !sp.derived {
		s.abandon(m)
	}
	if err != nil {
		return nil, err
	}
	if sp.derived && seen {
		live, err := s.accessLive(ctx, m.event.TokenDigest, m.access)
		if err != nil {
			s.log.Warn("cannot check a derived token; minting a fresh one", "err", err)
		}
		if err != nil || !live {
			s.metrics.coalesced.WithLabelValues("refused").Inc()
			if err := sp.randomize(sp.grant != "refresh_token"); err != nil {
				return nil, err
			}
			return s.mint(ctx, sp)
		}
		s.metrics.coalesced.WithLabelValues("shared").Inc()
	}
	s.metrics.issued.WithLabelValues(sp.grant).Inc()
	return m.resp, nil
}

// abandon records a token nobody was given as REVOKED. Its event may still
// be stored after an ack timeout; without this the token would get a row
// and, being the newest of its key, deactivate the token the client really
// holds. The REVOKED row takes the digest first, so the persister leaves it
// alone. Best effort: it needs Postgres within a moment, and if the event is
// persisted before it, the client's token may already be deactivated (it
// then re-requests on 401). Derived tokens are never abandoned: another
// request may hold the same token.
func (s *Server) abandon(m *minted) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := revoke.Token(ctx, s.db, m.event.TokenDigest, m.access); err != nil {
		s.log.Warn("could not record an unconfirmed token as revoked", "err", err, "token_digest", m.event.TokenDigest.String())
		return
	}
	s.metrics.revoked.WithLabelValues("abandoned").Inc()
}

// record makes the event durable: published and acknowledged by JetStream,
// or written in sync mode. seen reports that the same token was recorded
// before (a JetStream duplicate, or an existing row).
func (s *Server) record(ctx context.Context, ev *events.TokenIssued) (seen bool, err error) {
	if s.cfg.Mode == ModeSync {
		return s.persistSync(ctx, ev)
	}
	ack, err := s.publish(ctx, ev)
	if err != nil {
		return false, err
	}
	return ack.Duplicate, nil
}

// publish hands the event to JetStream and waits for its acknowledgement.
// Any failure means the token is never shown to the client.
func (s *Server) publish(ctx context.Context, ev *events.TokenIssued) (*jetstream.PubAck, error) {
	body, err := events.EncodeTokenIssued(ev)
	if err != nil {
		return nil, fmt.Errorf("encode event: %w", err)
	}
	if s.nc != nil && !s.nc.IsConnected() {
		s.metrics.publishErrors.WithLabelValues("disconnected").Inc()
		return nil, errUnavailable
	}
	start := time.Now()
	f, err := s.js.PublishAsync(s.cfg.Topology.IssuedSubject(), body,
		jetstream.WithMsgID(ev.TokenDigest.String()),
		jetstream.WithExpectStream(s.cfg.Topology.Stream),
		jetstream.WithStallWait(s.cfg.PublishTimeout))
	if err != nil {
		reason := "publish"
		if errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
			reason = "stalled" // MaxInFlight acks pending for the whole PublishTimeout
		}
		s.metrics.publishErrors.WithLabelValues(reason).Inc()
		s.log.Warn("publish refused", "err", err, "token_digest", ev.TokenDigest.String())
		return nil, errUnavailable
	}
	timer := time.NewTimer(s.cfg.PublishTimeout - time.Since(start))
	defer timer.Stop()
	// After a timeout or a vanished client JetStream may still store the
	// event: see abandon.
	select {
	case ack := <-f.Ok():
		s.metrics.publishSeconds.Observe(time.Since(start).Seconds())
		return ack, nil
	case err := <-f.Err():
		if errors.Is(err, jetstream.ErrAsyncPublishTimeout) {
			// The handle gave up waiting (PublishTimeout), not the server.
			s.metrics.publishErrors.WithLabelValues("timeout").Inc()
			s.log.Warn("publish not acknowledged in time", "timeout", s.cfg.PublishTimeout, "token_digest", ev.TokenDigest.String())
			return nil, errUnconfirmed
		}
		s.metrics.publishErrors.WithLabelValues("nack").Inc()
		s.log.Warn("publish failed", "err", err, "token_digest", ev.TokenDigest.String())
	case <-timer.C:
		s.metrics.publishErrors.WithLabelValues("timeout").Inc()
		s.log.Warn("publish not acknowledged in time", "timeout", s.cfg.PublishTimeout, "token_digest", ev.TokenDigest.String())
		return nil, errUnconfirmed
	case <-ctx.Done():
		s.metrics.publishErrors.WithLabelValues("client_gone").Inc()
		return nil, errUnconfirmed
	}
	return nil, errUnavailable
}

// persistSync writes the row in the request: deactivate the key's ACTIVE row
// and insert the new one in one transaction (WSO2's synchronous mode). It
// reports seen when the row already existed (a derived token minted by an
// earlier request); then nothing changes.
//
// Requests for the same key first queue on a transaction-scoped advisory
// lock: without it, N racing requests all fail the unique index but one,
// retry, and race again, so under contention some run out of retries. The
// retry remains for writers that do not take the lock (the persister in a
// mixed deployment) and for deadlocks and serialization failures.
func (s *Server) persistSync(ctx context.Context, ev *events.TokenIssued) (seen bool, err error) {
	var refresh, family []byte
	if ev.RefreshDigest != nil {
		refresh = ev.RefreshDigest[:]
	}
	if ev.FamilyID != nil {
		family = ev.FamilyID[:]
	}
	scope := ev.Scope()
	lock := keyLock(ev.ClientID, ev.Subject, scope)
	var last error
	for attempt := 0; ; attempt++ {
		err := pgx.BeginFunc(ctx, s.db, func(tx pgx.Tx) error {
			if err := revoke.LockShared(ctx, tx); err != nil {
				return err
			}
			b := &pgx.Batch{}
			b.Queue(`SELECT pg_advisory_xact_lock($1)`, lock)
			b.Queue(`UPDATE tokens SET state = 'INACTIVE', state_changed_at = now()
				WHERE client_id = $1 AND subject = $2 AND scope = $3 AND state = 'ACTIVE'
				  AND NOT EXISTS (SELECT 1 FROM tokens WHERE token_digest = $4)`,
				ev.ClientID, ev.Subject, scope, ev.TokenDigest[:])
			b.Queue(`INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
				grant_type, issued_at, expires_at, persisted_at, stream_seq, instance, family_id, refresh_expires_at)
				VALUES ($1, $2, $3, $4, $5,
				        CASE WHEN `+revoke.CoveredSQL("$10::bytea", "$3", "$4", "NULL::bigint")+` THEN 'REVOKED' ELSE 'ACTIVE' END,
				        $6, $7, $8, now(), NULL, $9, $10, $11)
				ON CONFLICT (token_digest) DO NOTHING`,
				ev.TokenDigest[:], refresh, ev.ClientID, ev.Subject, scope, ev.GrantType, ev.IssuedAt, ev.ExpiresAt,
				ev.Instance, family, ev.RefreshExpiresAt)
			// One round trip for the three statements.
			br := tx.SendBatch(ctx, b)
			defer br.Close()
			for range 2 {
				if _, err := br.Exec(); err != nil {
					return err
				}
			}
			tag, err := br.Exec()
			if err != nil {
				return err
			}
			seen = tag.RowsAffected() == 0
			return nil
		})
		if err == nil {
			return seen, nil
		}
		last = err
		if !retryable(err) || attempt >= s.cfg.SyncConflictRetries {
			break
		}
		s.metrics.syncRetries.Inc()
		// Jitter, so racers that collided once do not collide again.
		if err := sleep(ctx, mathrand.N(time.Duration(attempt+1)*5*time.Millisecond)); err != nil {
			last = errors.Join(last, err)
			break
		}
	}
	s.log.Error("sync persistence failed", "err", last, "client_id", ev.ClientID,
		"token_digest", ev.TokenDigest.String(), "retries", s.cfg.SyncConflictRetries)
	return false, errUnavailable
}
