// Cleanup: the deletes of rows nobody needs any more (see package cleanup
// for the schedule and the retention rules).

package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// A token row is deleted only once its every credential expired more than
// Retention ago, whatever its state. Before that the row must stay, whatever
// its state too: tokens are self-contained, so an unexpired token whose row
// is INACTIVE or REVOKED is refused only because that row says so. Deleting
// it would make the token look queued (no row yet), and a queued token is
// live. The refresh token outlives its access token, so it decides when
// present (coalesce, the expression of the tokens_purge index).
//
// The sub-select walks tokens_purge in order from the previous batch's last
// expiry (so it does not step over the index entries it just deleted again)
// and skips rows another transaction holds (a persister's or recovery's), so
// cleanup never waits on them; a skipped row goes in a later pass.
//
// The rows are deleted by the ctid the sub-select locked (a TID scan, not a
// primary key probe per row: half the work). A locked row cannot move, and
// a row updated between the statement's snapshot and the lock is simply
// not deleted by this batch.
const tokensSQL = `
DELETE FROM tokens WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM tokens
	WHERE coalesce(refresh_expires_at, expires_at) < $1
	  AND coalesce(refresh_expires_at, expires_at) >= $2
	ORDER BY coalesce(refresh_expires_at, expires_at)
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING coalesce(refresh_expires_at, expires_at)`

// A rotation is useless once its refresh token expired: presenting that
// token fails on its exp claim before anyone looks for reuse.
const rotationsSQL = `
DELETE FROM refresh_rotations WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM refresh_rotations
	WHERE expires_at < $1 AND expires_at >= $2
	ORDER BY expires_at
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING expires_at`

// An exchange is useless once its presented token expired, for the same
// reason.
const exchangesSQL = `
DELETE FROM token_exchanges WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM token_exchanges
	WHERE expires_at < $1 AND expires_at >= $2
	ORDER BY expires_at
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING expires_at`

// The revocation tables are small (one row per revocation) and have no index
// on revoked_at; a batch scans them.
const familiesSQL = `
DELETE FROM revoked_families WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM revoked_families
	WHERE revoked_at < $1 AND revoked_at >= $2
	ORDER BY revoked_at
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING revoked_at`

const grantsSQL = `
DELETE FROM revoked_grants WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM revoked_grants
	WHERE revoked_at < $1 AND revoked_at >= $2
	ORDER BY revoked_at
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING revoked_at`

// The tables cleanup deletes from, as named in its metrics.
const (
	TableTokens          = "tokens"
	TableRotations       = "refresh_rotations"
	TableExchanges       = "token_exchanges"
	TableRevokedFamilies = "revoked_families"
	TableRevokedGrants   = "revoked_grants"
)

var cleanupSQL = map[string]string{
	TableTokens:          tokensSQL,
	TableRotations:       rotationsSQL,
	TableExchanges:       exchangesSQL,
	TableRevokedFamilies: familiesSQL,
	TableRevokedGrants:   grantsSQL,
}

// CleanupCutoffs reads the database's clock, the clock the persisters' and
// revocations' timestamps come from, and returns the expiry before which
// token rows and rotations are due, and the revocation time before which
// revocations are due.
func CleanupCutoffs(ctx context.Context, db *pgxpool.Pool, retention, revocationRetention time.Duration) (tokens, revocations time.Time, err error) {
	err = db.QueryRow(ctx, `SELECT now() - $1::interval, now() - $2::interval`, retention, revocationRetention).
		Scan(&tokens, &revocations)
	if err != nil {
		return tokens, revocations, fmt.Errorf("read database clock: %w", err)
	}
	return tokens, revocations, nil
}

// DeleteExpired runs one delete batch on table, its own transaction: at most
// limit rows due before cutoff, from the keyset position from on. It returns
// how many rows it deleted and the latest expiry (or revocation time) among
// them, the next batch's from. Transient errors are retried with p: a delete
// of rows already gone deletes nothing, so a retry after an unknown outcome
// is safe.
func DeleteExpired(ctx context.Context, db *pgxpool.Pool, p RetryPolicy, table string, cutoff, from time.Time, limit int) (int, time.Time, error) {
	sql, ok := cleanupSQL[table]
	if !ok {
		return 0, time.Time{}, fmt.Errorf("cleanup: unknown table %q", table)
	}
	type result struct {
		n    int
		last time.Time
	}
	r, err := Retry(ctx, p, func(ctx context.Context) (result, error) {
		var r result
		rows, err := db.Query(ctx, sql, cutoff, from, limit)
		if err != nil {
			return r, err
		}
		var at time.Time
		_, err = pgx.ForEachRow(rows, []any{&at}, func() error {
			r.n++
			if at.After(r.last) {
				r.last = at
			}
			return nil
		})
		return r, err
	}, nil)
	return r.n, r.last, err
}
