// Revocations are recorded durably and win every race with the asynchronous
// pipeline. There are three kinds:
//   - Token: one access token. Its row is written REVOKED at once, and if
//     the TokenIssued event is still queued the row is inserted from the
//     token's own claims; the persister then finds the digest taken and
//     leaves it alone, in whichever order the two writes land.
//   - Family: one authorization and every token rotated from it (refresh
//     token revocation, refresh token reuse). Recorded in revoked_families.
//   - Grant: every token of a user for a client, or of all users of a
//     client, whose event JetStream had accepted when the revocation began
//     (a stream sequence watermark). Recorded in revoked_grants.
//
// Queued tokens of a revoked family or grant have no row to update, so every
// writer of token rows (persister, recovery, replay, the sync issuer) asks
// CoveredSQL whether a row it writes is revoked, and writes it REVOKED. The
// check and the revocation would race (each could miss the other's
// uncommitted write), so writers hold the revocation fence shared and family
// and grant revocations hold it exclusively: a revocation waits for the
// batches in flight and the next batches see it. Token revocations need no
// fence: the primary key orders them against the row's insert.

package store

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// fenceID is an advisory lock id every tokenpipe process agrees on.
const fenceID int64 = 7_460_301_119

// lockSharedSQL takes the revocation fence (shared).
const lockSharedSQL = `SELECT pg_advisory_xact_lock_shared($1)`

// LockShared takes the revocation fence for a transaction that writes token
// rows. Hold it before reading CoveredSQL.
func LockShared(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, lockSharedSQL, fenceID); err != nil {
		return fmt.Errorf("take revocation fence: %w", err)
	}
	return nil
}

// lockExclusive takes the revocation fence for a family or grant revocation:
// it waits for the batches in flight, and the next batches see it.
func lockExclusive(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, fenceID); err != nil {
		return fmt.Errorf("take revocation fence: %w", err)
	}
	return nil
}

// CoveredSQL returns a boolean SQL expression: is a token with these column
// expressions (family, client, subject, stream sequence) covered by a family
// or grant revocation? seq may be NULL (sync mode), which no watermark
// covers: sync rows exist before any later revocation can look for them.
func CoveredSQL(family, client, subject, seq string) string {
	return fmt.Sprintf(`(
	(%[1]s IS NOT NULL AND EXISTS (SELECT 1 FROM revoked_families rf WHERE rf.family_id = %[1]s))
	OR EXISTS (SELECT 1 FROM revoked_grants rg
	           WHERE rg.client_id = %[2]s AND rg.subject IN (%[3]s, '') AND rg.up_to_seq >= %[4]s))`,
		family, client, subject, seq)
}

// Revocation says what a revocation changed.
type Revocation struct {
	// Digests of rows that changed to REVOKED (or were inserted REVOKED).
	Digests []events.Digest
	// Families recorded as revoked.
	Families int
}

// RevokeToken revokes one access token, whose row may not exist yet: it is
// then inserted REVOKED from the claims (which come from the verified token
// text), and the persister later finds the digest taken.
func RevokeToken(ctx context.Context, db Beginner, digest events.Digest, c tokens.Claims) (Revocation, error) {
	var res Revocation
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `
			INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type,
			                    issued_at, expires_at, family_id, instance)
			VALUES ($1, $2, $3, $4, 'REVOKED', $5, $6, $7, $8, 'revocation')
			ON CONFLICT (token_digest) DO UPDATE SET state = 'REVOKED', state_changed_at = now()
			WHERE tokens.state <> 'REVOKED'`,
			digest[:], c.ClientID, c.Subject, c.Scope, c.Grant, c.IssuedAt, c.ExpiresAt, c.Family[:])
		if err != nil {
			return fmt.Errorf("revoke token: %w", err)
		}
		if tag.RowsAffected() > 0 {
			res.Digests = []events.Digest{digest}
		}
		return nil
	})
	return res, err
}

// RevokeFamily revokes every token of a family, stored or queued.
func RevokeFamily(ctx context.Context, db Beginner, f tokens.Family, reason string) (Revocation, error) {
	var res Revocation
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		res = Revocation{}
		if err := lockExclusive(ctx, tx); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO revoked_families (family_id, reason) VALUES ($1, $2)
			ON CONFLICT DO NOTHING`, f[:], reason)
		if err != nil {
			return fmt.Errorf("record family revocation: %w", err)
		}
		res.Families = int(tag.RowsAffected())
		res.Digests, err = revokeRows(ctx, tx, `family_id = $1`, f[:])
		return err
	})
	return res, err
}

// RevokeGrant revokes every token of subject for client (subject "": of
// every user of the client) whose event had stream sequence upToSeq or lower,
// and the families of the stored ones, so a refresh racing with the
// revocation cannot mint a survivor. 0 where there is no stream (sync mode).
func RevokeGrant(ctx context.Context, db Beginner, client, subject string, upToSeq uint64, reason string) (Revocation, error) {
	var res Revocation
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		res = Revocation{}
		if err := lockExclusive(ctx, tx); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO revoked_grants (client_id, subject, up_to_seq) VALUES ($1, $2, $3)
			ON CONFLICT (client_id, subject) DO UPDATE
			SET up_to_seq = greatest(revoked_grants.up_to_seq, excluded.up_to_seq), revoked_at = now()`,
			client, subject, int64(upToSeq))
		if err != nil {
			return fmt.Errorf("record grant revocation: %w", err)
		}
		const match = `client_id = $1 AND ($2 = '' OR subject = $2) AND (stream_seq IS NULL OR stream_seq <= $3)`
		tag, err := tx.Exec(ctx, `INSERT INTO revoked_families (family_id, reason)
			SELECT DISTINCT family_id, $4::text FROM tokens WHERE family_id IS NOT NULL AND `+match+`
			ON CONFLICT DO NOTHING`, client, subject, int64(upToSeq), reason)
		if err != nil {
			return fmt.Errorf("record families of grant: %w", err)
		}
		res.Families = int(tag.RowsAffected())
		res.Digests, err = revokeRows(ctx, tx, match, client, subject, int64(upToSeq))
		return err
	})
	return res, err
}

func revokeRows(ctx context.Context, tx pgx.Tx, where string, args ...any) ([]events.Digest, error) {
	rows, err := tx.Query(ctx, `UPDATE tokens SET state = 'REVOKED', state_changed_at = now()
		WHERE state <> 'REVOKED' AND `+where+` RETURNING token_digest`, args...)
	if err != nil {
		return nil, fmt.Errorf("revoke rows: %w", err)
	}
	digests, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (events.Digest, error) {
		var b []byte
		err := r.Scan(&b)
		return events.Digest(b), err
	})
	if err != nil {
		return nil, fmt.Errorf("revoke rows: %w", err)
	}
	return digests, nil
}

// revokeFamiliesSQL extends a grant revocation to the families of the rows
// it covered on their way in: a refresh that raced with the revocation may
// have minted a newer member the watermark does not reach. Planned each time
// (planEachTime): a join of a batch with tokens.
const revokeFamiliesSQL = `
WITH fresh AS (
	INSERT INTO revoked_families (family_id, reason)
	SELECT unnest($1::bytea[]), 'grant_revoked'
	ON CONFLICT DO NOTHING
	RETURNING family_id
)
UPDATE tokens SET state = 'REVOKED', state_changed_at = now()
WHERE family_id IN (SELECT family_id FROM fresh) AND state <> 'REVOKED'`

// revokeFamiliesOf revokes the families of rows a batch wrote REVOKED.
func revokeFamiliesOf(ctx context.Context, tx pgx.Tx, families [][]byte) error {
	if _, err := tx.Exec(ctx, revokeFamiliesSQL, planEachTime, families); err != nil {
		return fmt.Errorf("revoke families of %d revoked rows: %w", len(families), err)
	}
	return nil
}
