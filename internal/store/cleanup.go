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

// purgeSQL deletes one batch of table's rows whose due time (the
// expression due) is before $1 and not before $2, at most $3 of them, and
// returns their due times: the batch statement of every table cleanup
// empties.
//
// A token row is deleted only once its every credential expired more than
// Retention ago, whatever its state. Before that the row must stay, whatever
// its state too: tokens are self-contained, so an unexpired token whose row
// is INACTIVE or REVOKED is refused only because that row says so. Deleting
// it would make the token look queued (no row yet), and a queued token is
// live.
//
// The sub-select walks the due times in order (for tokens, along
// tokens_purge) from the previous batch's last one, so it does not step over
// the index entries it just deleted again, and skips rows another
// transaction holds (a persister's or recovery's), so cleanup never waits
// on them; a skipped row goes in a later pass.
//
// The rows are deleted by the ctid the sub-select locked (a TID scan, not a
// primary key probe per row: half the work). A locked row cannot move, and
// a row updated between the statement's snapshot and the lock is simply
// not deleted by this batch. The statement is planned each time
// (planEachTime): a plan cached while the table was small scanned the
// whole table for every batch instead of the TID scan.
func purgeSQL(table, due string) string {
	return `
DELETE FROM ` + table + ` WHERE ctid = ANY(ARRAY(
	SELECT ctid FROM ` + table + `
	WHERE ` + due + ` < $1 AND ` + due + ` >= $2
	ORDER BY ` + due + `
	LIMIT $3
	FOR UPDATE SKIP LOCKED))
RETURNING ` + due
}

// The tables cleanup deletes from, as named in its metrics.
const (
	TableTokens          = "tokens"
	TableRotations       = "refresh_rotations"
	TableExchanges       = "token_exchanges"
	TableRevokedFamilies = "revoked_families"
	TableRevokedGrants   = "revoked_grants"
)

var cleanupSQL = map[string]string{
	// The refresh token outlives its access token, so it decides when
	// present (the expression of the tokens_purge index).
	TableTokens: purgeSQL(TableTokens, "coalesce(refresh_expires_at, expires_at)"),
	// A rotation is useless once its refresh token expired: presenting that
	// token fails on its exp claim before anyone looks for reuse.
	TableRotations: purgeSQL(TableRotations, "expires_at"),
	// An exchange is useless once its presented token expired, for the same
	// reason.
	TableExchanges: purgeSQL(TableExchanges, "expires_at"),
	// The revocation tables are small (one row per revocation) and have no
	// index on revoked_at; a batch scans them.
	TableRevokedFamilies: purgeSQL(TableRevokedFamilies, "revoked_at"),
	TableRevokedGrants:   purgeSQL(TableRevokedGrants, "revoked_at"),
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
		rows, err := db.Query(ctx, sql, planEachTime, cutoff, from, limit)
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
