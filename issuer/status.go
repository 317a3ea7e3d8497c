package issuer

import (
	"context"
	"fmt"
	"time"

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
// records, or, while its row is queued, with a recent grant revocation.
const refreshStatusSQL = `
SELECT EXISTS (SELECT 1 FROM tokens WHERE refresh_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '') AND revoked_at >= $5),
       (SELECT rotated_at FROM refresh_rotations WHERE refresh_digest = $1)`

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
	revoked   bool
	rotatedAt *time.Time // first redemption, if any
}

func (s *Server) refreshState(ctx context.Context, d events.Digest, c tokens.Claims) (refreshStatus, error) {
	var hasRow, familyRevoked, grantRevoked bool
	var st refreshStatus
	err := s.db.QueryRow(ctx, refreshStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, c.IssuedAt.Add(-maxClockSkew)).
		Scan(&hasRow, &familyRevoked, &grantRevoked, &st.rotatedAt)
	if err != nil {
		return st, fmt.Errorf("refresh token status: %w", err)
	}
	st.revoked = familyRevoked || (!hasRow && grantRevoked)
	return st, nil
}
