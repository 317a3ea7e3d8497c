// The issuer's reads: what the database says of a token it is asked about,
// and the refresh rotations it records. The issuer decides what the answers
// mean; the statements live here.

package store

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// Querier runs single statements: a pool, a connection or a transaction.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// A token's row, once written, says whether it is live: every writer applies
// revocations on the way in and every revocation updates the rows it finds.
// Before the row exists (the event is queued) the token is live unless its
// family was revoked, or a grant revocation of its client and user happened
// after it could have been issued (grantSince).
const accessStatusSQL = `
SELECT (SELECT state FROM tokens WHERE token_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '') AND revoked_at >= $5),
       x.subject_digest IS NOT NULL,
       coalesce(clock_timestamp() <= x.valid_until, true),
       x.valid_until,
       x.subject_digest IS NOT NULL AND EXISTS (SELECT 1 FROM tokens a
               WHERE a.client_id = $3 AND a.subject = $4 AND a.scope = $6 AND a.state = 'ACTIVE' AND a.family_id = $2
                 AND ` + successorHoldsKey + `)
FROM (SELECT 1) AS one LEFT JOIN token_exchanges x ON x.subject_digest = $1`

// AccessStatus is what the database says of an access token; Effective
// (exchange.go) turns it into the token's state.
type AccessStatus struct {
	State         *string // the row's state; nil while the event is queued
	FamilyRevoked bool
	GrantRevoked  bool       // a grant revocation at or after grantSince
	Exchanged     bool       // the token was exchanged (per-request rotation)
	WindowOpen    bool       // ... and its batch window is open or not started, by the database's clock
	ValidUntil    *time.Time // ... and ends then (nil: not started, no exchange was answered)
	// FamilyHoldsKey: the key's ACTIVE row belongs to the token's family (read
	// only for exchanged tokens): its successors still hold the key.
	FamilyHoldsKey bool
}

// ReadAccessStatus reads an access token's row and the revocations that
// would cover it while queued.
func ReadAccessStatus(ctx context.Context, db Querier, d events.Digest, c tokens.Claims, grantSince time.Time) (AccessStatus, error) {
	var st AccessStatus
	err := db.QueryRow(ctx, accessStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, grantSince, c.Scope).
		Scan(&st.State, &st.FamilyRevoked, &st.GrantRevoked, &st.Exchanged, &st.WindowOpen, &st.ValidUntil, &st.FamilyHoldsKey)
	return st, err
}

// A refresh token does not die with its access token's row: an access token
// expires, is superseded or revoked alone (RFC 7009 lets the refresh token
// live on). It dies with its family, which every family or grant revocation
// records, or, while its row is queued, with a recent grant revocation. It
// also dies with its user.
const refreshStatusSQL = `
SELECT EXISTS (SELECT 1 FROM tokens WHERE refresh_digest = $1),
       EXISTS (SELECT 1 FROM revoked_families WHERE family_id = $2),
       EXISTS (SELECT 1 FROM revoked_grants
               WHERE client_id = $3 AND subject IN ($4, '') AND revoked_at >= $5),
       (SELECT answered_at FROM refresh_rotations WHERE refresh_digest = $1),
       $4 = $3 OR EXISTS (SELECT 1 FROM users WHERE username = $4 AND created_at <= $6)`

// RefreshStatus is what the database says of a refresh token.
type RefreshStatus struct {
	HasRow        bool // a token row carries this refresh digest
	FamilyRevoked bool
	GrantRevoked  bool       // a grant revocation at or after grantSince
	AnsweredAt    *time.Time // first answered redemption, if any
	UserExists    bool       // the resource owner (or, for a client's own token, the client)
}

// ReadRefreshStatus reads what decides whether a refresh token is live. The
// user must exist and have been created no later than userBefore, so a
// removed user's tokens stay dead when the name is given to someone new.
func ReadRefreshStatus(ctx context.Context, db Querier, d events.Digest, c tokens.Claims, grantSince, userBefore time.Time) (RefreshStatus, error) {
	var st RefreshStatus
	err := db.QueryRow(ctx, refreshStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, grantSince, userBefore).
		Scan(&st.HasRow, &st.FamilyRevoked, &st.GrantRevoked, &st.AnsweredAt, &st.UserExists)
	return st, err
}

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

// RecordedStatus is what became of a token recorded before.
type RecordedStatus struct {
	State         *string // nil while the event is queued
	FamilyRevoked bool
	GrantRevoked  bool
	Rotated       bool // its refresh token was redeemed
}

// ReadRecordedStatus reads the fate of a token recorded at stream sequence
// seq (0 in sync mode: then grant revocations at or after grantSince count).
// refresh is its refresh token's digest, nil if it has none.
func ReadRecordedStatus(ctx context.Context, db Querier, d events.Digest, c tokens.Claims, seq uint64, grantSince time.Time, refresh []byte) (RecordedStatus, error) {
	var st RecordedStatus
	err := db.QueryRow(ctx, recordedStatusSQL, d[:], c.Family[:], c.ClientID, c.Subject, int64(seq), grantSince, refresh).
		Scan(&st.State, &st.FamilyRevoked, &st.GrantRevoked, &st.Rotated)
	return st, err
}

// activeOfKeySQL reads a key's ACTIVE row and whether it may be shared.
const activeOfKeySQL = `
SELECT t.token_digest, t.family_id, t.issued_at, t.grant_type, t.refresh_digest IS NOT NULL,
       EXISTS (SELECT 1 FROM revoked_families rf WHERE rf.family_id = t.family_id),
       EXISTS (SELECT 1 FROM refresh_rotations rr WHERE rr.refresh_digest = t.refresh_digest)
FROM tokens t
WHERE t.client_id = $1 AND t.subject = $2 AND t.scope = $3 AND t.state = 'ACTIVE'`

// SharedCandidate is a key's ACTIVE row, as the issuer needs it to share a token.
type SharedCandidate struct {
	Digest        []byte
	Family        []byte // nil when the token has no family
	IssuedAt      time.Time
	GrantType     string
	HasRefresh    bool
	FamilyRevoked bool
	Rotated       bool // its refresh token was redeemed
}

// ReadActiveOfKey returns the key's ACTIVE row, or nil when it has none.
func ReadActiveOfKey(ctx context.Context, db Querier, k Key) (*SharedCandidate, error) {
	var r SharedCandidate
	err := db.QueryRow(ctx, activeOfKeySQL, k.ClientID, k.Subject, k.Scope).
		Scan(&r.Digest, &r.Family, &r.IssuedAt, &r.GrantType, &r.HasRefresh, &r.FamilyRevoked, &r.Rotated)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &r, nil
}

// Rotation is a refresh token's first redemption, as recorded.
type Rotation struct {
	At       time.Time // UTC, whole milliseconds
	Scope    *string   // nil on rows from before the scope was recorded
	Answered bool      // the successor pair was recorded and could be handed out
	Reuse    bool      // answered longer ago than the grace window
}

// RecordRotation records the first redemption of a refresh token, with its
// time (the database's clock, so issuer clocks need not agree) and the
// successor's scope. It reports false, without error, when a redemption was
// recorded before; only a later statement (ReadRotation) can see one that
// committed while this one waited.
func RecordRotation(ctx context.Context, db Querier, d events.Digest, expiresAt time.Time, scope string) (time.Time, bool, error) {
	var at time.Time
	err := db.QueryRow(ctx, `INSERT INTO refresh_rotations (refresh_digest, rotated_at, expires_at, scope)
		VALUES ($1, date_trunc('milliseconds', clock_timestamp()), $2, $3)
		ON CONFLICT DO NOTHING RETURNING rotated_at`, d[:], expiresAt, scope).Scan(&at)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, err
	}
	return at.UTC(), true, nil
}

// ReadRotation reads a refresh token's recorded redemption; Reuse says its
// answer is older than grace.
func ReadRotation(ctx context.Context, db Querier, d events.Digest, grace time.Duration) (Rotation, error) {
	var rot Rotation
	err := db.QueryRow(ctx, `SELECT rotated_at, scope, answered_at IS NOT NULL,
			coalesce(clock_timestamp() - answered_at > $2, false)
		FROM refresh_rotations WHERE refresh_digest = $1`, d[:], grace).Scan(&rot.At, &rot.Scope, &rot.Answered, &rot.Reuse)
	rot.At = rot.At.UTC()
	return rot, err
}

// MarkRotationAnswered records that a refresh token's successor pair was
// handed out: from now on a redemption after the grace window is reuse.
func MarkRotationAnswered(ctx context.Context, db Querier, d events.Digest) error {
	_, err := db.Exec(ctx, `UPDATE refresh_rotations SET answered_at = clock_timestamp()
		WHERE refresh_digest = $1 AND answered_at IS NULL`, d[:])
	return err
}
