package issuer

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
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
	// refreshScope and refreshExpires describe the refresh token when they
	// differ from the access token's: a rotated refresh token keeps the
	// presented one's scope and expiry (RFC 6749 section 6; an absolute
	// family lifetime), while its access token may be narrowed.
	refreshScope   string
	refreshExpires time.Time
	refreshIssued  time.Time
	// refreshRecorded: the refresh token is already recorded with an earlier
	// event; it goes into the answer but not into this event (a refresh
	// digest has one row).
	refreshRecorded bool
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

// request is what makes two token requests identical for coalescing.
type request struct {
	clientID, subject, grant string
	scopes                   []string
	refresh                  bool
}

// maxGenerations bounds how many distinct tokens identical requests can
// derive in one coalescing window. A new generation is derived only when the
// previous one was revoked, or superseded by a token that is not ours to
// hand out again (a refresh, another grant); each takes an outside event, so
// a handful is plenty.
const maxGenerations = 8

// coalescedSpec is the token every identical request in window derives:
// instances agree without talking, because the window is cut from the clock
// and the token from the shared key. Generation 0 uses the derivation of
// earlier releases, so a rolling upgrade keeps coalescing.
func (s *Server) coalescedSpec(rq request, window int64, gen int) spec {
	w := s.cfg.CoalesceWindow.Milliseconds()
	sp := spec{clientID: rq.clientID, subject: rq.subject, grant: rq.grant, scopes: rq.scopes, refresh: rq.refresh,
		issuedAt: time.UnixMilli(window * w).UTC(), derived: true}
	parts := [][]byte{[]byte(rq.clientID), []byte(rq.subject), []byte(events.JoinScopes(rq.scopes)), []byte(rq.grant),
		binary.BigEndian.AppendUint64(nil, uint64(window))}
	if gen > 0 {
		parts = append(parts, []byte{byte(gen)})
	}
	sp.accessNonce = s.cfg.Keys.Derive("coalesce/access", parts...)
	sp.refreshNonce = s.cfg.Keys.Derive("coalesce/refresh", parts...)
	sp.family = s.cfg.Keys.Derive("coalesce/family", parts...)
	return sp
}

// randomSpec is a token nobody else can have minted.
func randomSpec(rq request, now time.Time) (spec, error) {
	sp := spec{clientID: rq.clientID, subject: rq.subject, grant: rq.grant, scopes: rq.scopes, refresh: rq.refresh,
		issuedAt: now.Truncate(time.Millisecond)}
	return sp, sp.randomize(true)
}

// minted is a spec turned into token texts, claims and the event.
type minted struct {
	resp    *tokenResponse
	access  tokens.Claims
	event   *events.TokenIssued
	refresh string
}

func (s *Server) build(sp spec, now time.Time) (*minted, error) {
	// Events carry UTC times: the event encoder's reflection-free path takes
	// only those, and time.Now is in the local zone.
	sp.issuedAt, sp.refreshIssued, sp.refreshExpires = sp.issuedAt.UTC(), sp.refreshIssued.UTC(), sp.refreshExpires.UTC()
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
		if sp.refreshScope != "" {
			rc.Scope = sp.refreshScope
		}
		if !sp.refreshExpires.IsZero() {
			rc.ExpiresAt = sp.refreshExpires
		}
		if !sp.refreshIssued.IsZero() {
			rc.IssuedAt = sp.refreshIssued
		}
		rt, err := s.cfg.Keys.Encode(rc)
		if err != nil {
			return nil, err
		}
		if !sp.refreshRecorded {
			d := events.DigestOf(rt)
			m.event.RefreshDigest, m.event.RefreshExpiresAt = &d, &rc.ExpiresAt
		}
		m.resp.RefreshToken, m.refresh = rt, rt
	}
	return m, nil
}

// expiresIn is RFC 6749's expires_in: seconds left, rounded, at least 1.
func expiresIn(exp, now time.Time) int64 {
	return max(1, int64((exp.Sub(now)+time.Second/2)/time.Second))
}

// mintFresh records a token minted at random and returns the answer. A
// token whose recording is unconfirmed is abandoned: nobody holds it.
func (s *Server) mintFresh(ctx context.Context, sp spec) (*tokenResponse, error) {
	m, err := s.build(sp, time.Now())
	if err != nil {
		return nil, err
	}
	if _, _, err := s.record(ctx, m.event); err != nil {
		if errors.Is(err, errUnconfirmed) {
			s.abandon(m)
		}
		return nil, err
	}
	s.metrics.issued.WithLabelValues(sp.grant).Inc()
	return m.resp, nil
}

// mintCoalesced answers a client_credentials or password request so that
// identical requests share one token, and a shared token is live when it is
// handed out.
//
// Every identical request in a window derives the same token; JetStream's
// deduplication tells a request whether the token was recorded before, and
// only then is its state looked up. A token that is still live is shared.
// One that a newer token of its key superseded is never handed out again:
// the request shares the key's ACTIVE token instead when it is one of ours
// (a coalesced token of the same request, which can be derived again), so a
// request that outlived its window converges on the newer window's token
// instead of minting one that would supersede it. Only when the key's newest
// token cannot be shared (it was revoked, or minted by a refresh or another
// grant) does the request derive the next generation, which later identical
// requests derive too. So identical requests receive one token per window,
// plus one per outside event, never a series that deactivates itself.
//
// When a state cannot be read (Postgres unreachable), a token is minted at
// random: a revoked token must never be handed out again.
//
// Over 60 lines on purpose: one loop over generations whose cases (shared,
// superseded, moved on to the next window, next generation) restart or leave
// it; split into steps, the loop state (window, gen, movedOn) would have to
// travel between them and the order of the cases would be harder to follow.
func (s *Server) mintCoalesced(ctx context.Context, rq request) (*tokenResponse, error) {
	w := s.cfg.CoalesceWindow.Milliseconds()
	window := s.now().UnixMilli() / w
	movedOn := false
attempts:
	for gen := 0; gen < maxGenerations; gen++ {
		m, err := s.build(s.coalescedSpec(rq, window, gen), time.Now())
		if err != nil {
			return nil, err
		}
		// Derived tokens are never abandoned: another request may hold one.
		seen, seq, err := s.record(ctx, m.event)
		if err != nil {
			return nil, err
		}
		if !seen {
			s.metrics.issued.WithLabelValues(rq.grant).Inc()
			return m.resp, nil
		}
		st, err := s.recordedState(ctx, m, seq, true)
		if err != nil {
			s.log.Warn("cannot check a coalesced token; minting a fresh one", "err", err)
			break
		}
		current := s.now().UnixMilli() / w
		switch st {
		case stateLive:
			if current > window && !movedOn {
				// The request outlived its window: the next identical request
				// supersedes this token, so converge on the current window's.
				window, gen, movedOn = current, -1, true
				continue
			}
			s.metrics.coalesced.WithLabelValues("shared").Inc()
			s.metrics.issued.WithLabelValues(rq.grant).Inc()
			return m.resp, nil
		case stateSuperseded:
			newer, err := s.shareActive(ctx, rq, time.Now())
			if err != nil {
				s.log.Warn("cannot read the key's active token; minting a fresh one", "err", err)
				break attempts
			}
			if newer != nil {
				s.metrics.coalesced.WithLabelValues("shared_newer").Inc()
				s.metrics.issued.WithLabelValues(rq.grant).Inc()
				return newer.resp, nil
			}
			if current > window && !movedOn {
				window, gen, movedOn = current, -1, true
				continue
			}
		}
		s.metrics.coalesced.WithLabelValues("next_generation").Inc()
	}
	s.metrics.coalesced.WithLabelValues("fresh").Inc()
	sp, err := randomSpec(rq, time.Now())
	if err != nil {
		return nil, err
	}
	return s.mintFresh(ctx, sp)
}

// mintRotation records a refresh token's successor pair, derived the same by
// every redemption inside the grace window. When it was recorded before and
// its access token has since been superseded, the answer carries a fresh
// access token with the same successor refresh token, so one refresh token
// never has two successors and no answer carries a dead access token.
func (s *Server) mintRotation(ctx context.Context, sp spec) (*tokenResponse, error) {
	m, err := s.build(sp, time.Now())
	if err != nil {
		return nil, err
	}
	seen, seq, err := s.record(ctx, m.event)
	if err != nil {
		return nil, err
	}
	if seen {
		st, err := s.recordedState(ctx, m, seq, false)
		if err != nil {
			return nil, err
		}
		switch st {
		case stateDead:
			return nil, badRequest("invalid_grant", "the refresh token was revoked")
		case stateSuperseded:
			s.metrics.coalesced.WithLabelValues("rotation_fresh_access").Inc()
			fresh := sp
			if _, err := rand.Read(fresh.accessNonce[:]); err != nil {
				return nil, fmt.Errorf("generate token: %w", err)
			}
			fresh.refreshIssued = sp.issuedAt // the refresh token stays exactly the one recorded
			fresh.issuedAt, fresh.refreshRecorded, fresh.derived = time.Now().Truncate(time.Millisecond), true, false
			return s.mintFresh(ctx, fresh)
		}
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
	if _, err := store.RevokeToken(ctx, s.db, m.event.TokenDigest, m.access); err != nil {
		s.log.Warn("could not record an unconfirmed token as revoked", "err", err, "token_digest", m.event.TokenDigest.String())
		return
	}
	s.metrics.revoked.WithLabelValues("abandoned").Inc()
}

// record makes the event durable: published and acknowledged by JetStream,
// or written in sync mode. seen reports that the same token was recorded
// before (a JetStream duplicate, or an existing row); seq is the event's
// stream sequence (the original's for a duplicate), 0 in sync mode.
func (s *Server) record(ctx context.Context, ev *events.TokenIssued) (seen bool, seq uint64, err error) {
	if s.cfg.Mode == ModeSync {
		seen, err := s.persistSync(ctx, ev)
		return seen, 0, err
	}
	ack, err := s.publish(ctx, ev)
	if err != nil {
		return false, 0, err
	}
	return ack.Duplicate, ack.Sequence, nil
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
	f, err := s.batch.publish(s.js, s.cfg.Topology.IssuedSubjectOf(ev.ClientID, ev.Subject, ev.Scope()), body,
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

// persistSync writes the row in the request (store.WriteSync), retrying a
// lost race with jitter. It reports seen when the row already existed (a
// derived token minted by an earlier request); then nothing changes.
func (s *Server) persistSync(ctx context.Context, ev *events.TokenIssued) (seen bool, err error) {
	var last error
	for attempt := 0; ; attempt++ {
		seen, err := store.WriteSync(ctx, s.db, ev)
		if err == nil {
			return seen, nil
		}
		last = err
		if !store.LostRace(err) || attempt >= s.cfg.SyncConflictRetries {
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
