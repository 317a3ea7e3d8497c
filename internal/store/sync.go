// The sync-mode write: the issuer records a token in the request, without
// the stream (WSO2's synchronous mode).

package store

import (
	"context"
	"errors"
	"hash/fnv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tokenpipe/tokenpipe/events"
)

// syncDeactivateSQL retires the key's ACTIVE row, unless the token being
// written already has its row (then nothing changes).
const syncDeactivateSQL = `UPDATE tokens SET state = 'INACTIVE', state_changed_at = now()
	WHERE client_id = $1 AND subject = $2 AND scope = $3 AND state = 'ACTIVE'
	  AND NOT EXISTS (SELECT 1 FROM tokens WHERE token_digest = $4)`

// syncInsertSQL writes the row ACTIVE, or REVOKED when a revocation covers
// it. A sync row has no stream sequence.
var syncInsertSQL = `INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
	grant_type, issued_at, expires_at, persisted_at, stream_seq, instance, family_id, refresh_expires_at)
	VALUES ($1, $2, $3, $4, $5,
	        CASE WHEN ` + CoveredSQL("$10::bytea", "$3", "$4", "NULL::bigint") + ` THEN 'REVOKED' ELSE 'ACTIVE' END,
	        $6, $7, $8, now(), NULL, $9, $10, $11)
	ON CONFLICT (token_digest) DO NOTHING`

// WriteSync writes one token row in one transaction: deactivate the key's
// ACTIVE row and insert the new one. It reports seen when the row already
// existed (a derived token minted by an earlier request); then nothing
// changes. It makes one attempt: LostRace says whether a failure is worth
// another.
//
// Writers of the same key first queue on a transaction-scoped advisory lock:
// without it, N racing writers all fail the unique index but one, retry, and
// race again, so under contention some run out of retries. A lost race
// remains possible against writers that do not take the lock (the persister
// in a mixed deployment), and so do deadlocks and serialization failures.
func WriteSync(ctx context.Context, db Beginner, ev *events.TokenIssued) (seen bool, err error) {
	scope := ev.Scope()
	err = pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if err := LockShared(ctx, tx); err != nil {
			return err
		}
		b := &pgx.Batch{}
		b.Queue(`SELECT pg_advisory_xact_lock($1)`, keyLock(ev.ClientID, ev.Subject, scope))
		b.Queue(syncDeactivateSQL, ev.ClientID, ev.Subject, scope, ev.TokenDigest[:])
		b.Queue(syncInsertSQL, ev.TokenDigest[:], refreshBytes(ev), ev.ClientID, ev.Subject, scope,
			ev.GrantType, ev.IssuedAt, ev.ExpiresAt, ev.Instance, familyBytes(ev), ev.RefreshExpiresAt)
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
	return seen, err
}

// LostRace reports a lost race: unique violation, serialization failure or
// deadlock. A fresh transaction sees the winner and succeeds.
func LostRace(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "23505" || pe.Code == "40001" || pe.Code == "40P01")
}

// keyLock maps a (client, subject, scope) key to an advisory lock id. Two
// keys sharing an id merely queue behind each other.
func keyLock(clientID, subject, scope string) int64 {
	h := fnv.New64a()
	for _, part := range []string{clientID, subject, scope} {
		h.Write([]byte(part))
		h.Write([]byte{0}) // no part contains NUL, so the key is unambiguous
	}
	return int64(h.Sum64())
}
