package issuer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/tokens"
)

// A token's row, once written, says whether it is live: every writer applies
// revocations on the way in and every revocation updates the rows it finds.
// Before the row exists (the event is queued) the token is live unless its
// family was revoked, or a grant revocation of its client and user happened
// after it could have been issued (see maxClockSkew).
const accessStatusSQL = `
SELECT (SELECT state FROM tokens WHERE token_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '') AND revoked_at >= $5)`

// A refresh token does not die with its access token's row: an access token
// expires, is superseded or revoked alone (RFC 7009 lets the refresh token
// live on). It dies with its family, which every family or grant revocation
// records, or, while its row is queued, with a recent grant revocation. It
// also dies with its user, and stays dead when a user of the same name is
// added later: the user must have existed when the token was issued ($6 is
// the issue time plus the margins by which it can read early).
const refreshStatusSQL = `
SELECT EXISTS (SELECT 1 FROM tokens WHERE refresh_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '') AND revoked_at >= $5),
       (SELECT answered_at FROM refresh_rotations WHERE refresh_digest = $1),
       $4 = $3 OR EXISTS (SELECT 1 FROM users WHERE username = $4 AND created_at <= $6)`

// accessLive reports whether an unexpired access token is live.
func (s *Server) accessLive(ctx context.Context, d events.Digest, c tokens.Claims) (bool, error) {
	live, _, err := s.accessStatus(ctx, d, c)
	return live, err
}

// accessStatus reports whether an unexpired access token is live, and
// whether that came from its row.
func (s *Server) accessStatus(ctx context.Context, d events.Digest, c tokens.Claims) (live, hasRow bool, err error) {
	var state *string
	var familyRevoked, grantRevoked bool
	err = s.db.QueryRow(ctx, accessStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, c.IssuedAt.Add(-maxClockSkew)).
		Scan(&state, &familyRevoked, &grantRevoked)
	if err != nil {
		return false, false, fmt.Errorf("access token status: %w", err)
	}
	if state != nil {
		return *state == "ACTIVE", true, nil
	}
	return !familyRevoked && !grantRevoked, false, nil
}

// refreshStatus is what the database says of a refresh token.
type refreshStatus struct {
	revoked    bool
	answeredAt *time.Time // first answered redemption, if any
	userExists bool       // the resource owner (or, for a client's own token, the client)
}

func (s *Server) refreshState(ctx context.Context, d events.Digest, c tokens.Claims) (refreshStatus, error) {
	var hasRow, familyRevoked, grantRevoked bool
	var st refreshStatus
	// A coalesced token's issue time is its window's start, and issuer
	// clocks may trail the database's.
	userBefore := c.IssuedAt.Add(maxClockSkew + s.cfg.CoalesceWindow)
	err := s.db.QueryRow(ctx, refreshStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, c.IssuedAt.Add(-maxClockSkew), userBefore).
		Scan(&hasRow, &familyRevoked, &grantRevoked, &st.answeredAt, &st.userExists)
	if err != nil {
		return st, fmt.Errorf("refresh token status: %w", err)
	}
	st.revoked = familyRevoked || (!hasRow && grantRevoked)
	return st, nil
}

// recorded is what a request that derived an already recorded token needs to
// know about it.
type recorded int

const (
	stateLive       recorded = iota // may be handed out (again)
	stateSuperseded                 // INACTIVE: a newer token of its key won
	stateDead                       // revoked, expired, or (coalesced) its refresh token already used
)

// recordedStatusSQL reads a recorded token's fate. Unlike accessStatusSQL it
// knows the event's stream sequence, so a grant revocation covers the queued
// token exactly as the persister will decide (up_to_seq >= seq); without a
// sequence (sync mode: the row exists) it falls back to the issue time.
const recordedStatusSQL = `
SELECT (SELECT state FROM tokens WHERE token_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '')
                 AND CASE WHEN $5::bigint > 0 THEN up_to_seq >= $5::bigint ELSE revoked_at >= $6 END),
       EXISTS (SELECT 1 FROM refresh_rotations WHERE refresh_digest = $7)`

// recordedState reports what became of a token recorded before. With
// refreshUsed, a token whose refresh token was already redeemed counts as
// dead: sharing it would hand a used refresh token to a new client.
func (s *Server) recordedState(ctx context.Context, m *minted, seq uint64, refreshUsed bool) (recorded, error) {
	var state *string
	var familyRevoked, grantRevoked, rotated bool
	var refresh []byte
	if m.refresh != "" {
		d := events.DigestOf(m.refresh)
		refresh = d[:]
	}
	err := s.db.QueryRow(ctx, recordedStatusSQL, m.event.TokenDigest[:], m.access.Family[:], m.access.ClientID,
		m.access.Subject, int64(seq), m.access.IssuedAt.Add(-maxClockSkew), refresh).
		Scan(&state, &familyRevoked, &grantRevoked, &rotated)
	if err != nil {
		return stateDead, fmt.Errorf("recorded token status: %w", err)
	}
	switch {
	case familyRevoked, state == nil && grantRevoked, refreshUsed && rotated:
		return stateDead, nil
	case state == nil, *state == "ACTIVE":
		return stateLive, nil
	case *state == "INACTIVE":
		return stateSuperseded, nil
	}
	return stateDead, nil
}

// activeOfKeySQL reads a key's ACTIVE row and whether it may be shared.
const activeOfKeySQL = `
SELECT t.token_digest, t.family_id, t.issued_at, t.grant_type, t.refresh_digest IS NOT NULL,
       EXISTS (SELECT 1 FROM revoked_families rf WHERE rf.family_id = t.family_id),
       EXISTS (SELECT 1 FROM refresh_rotations rr WHERE rr.refresh_digest = t.refresh_digest)
FROM tokens t
WHERE t.client_id = $1 AND t.subject = $2 AND t.scope = $3 AND t.state = 'ACTIVE'`

// shareActive returns the key's ACTIVE token when it is a coalesced token of
// the same request, so it can be derived again (its text is stored nowhere);
// nil when there is none or it is not ours to hand out.
func (s *Server) shareActive(ctx context.Context, rq request, now time.Time) (*minted, error) {
	var digest, family []byte
	var issuedAt time.Time
	var grant string
	var hasRefresh, familyRevoked, rotated bool
	err := s.db.QueryRow(ctx, activeOfKeySQL, rq.clientID, rq.subject, events.JoinScopes(rq.scopes)).
		Scan(&digest, &family, &issuedAt, &grant, &hasRefresh, &familyRevoked, &rotated)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the key's active token: %w", err)
	}
	w := s.cfg.CoalesceWindow.Milliseconds()
	ms := issuedAt.UnixMilli()
	if grant != rq.grant || hasRefresh != rq.refresh || familyRevoked || rotated || len(family) != len(tokens.Family{}) || w <= 0 || ms%w != 0 {
		return nil, nil
	}
	for gen := range maxGenerations {
		sp := s.coalescedSpec(rq, ms/w, gen)
		if !bytes.Equal(sp.family[:], family) {
			continue
		}
		m, err := s.build(sp, now)
		if err != nil {
			return nil, err
		}
		// Another signing key (a rotation in progress) derives another text.
		if !bytes.Equal(m.event.TokenDigest[:], digest) || m.access.Expired(now) {
			return nil, nil
		}
		return m, nil
	}
	return nil, nil
}
