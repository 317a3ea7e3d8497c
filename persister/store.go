package persister

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

// Row is one TokenIssued event with the stream sequence JetStream gave it.
type Row struct {
	Event *events.TokenIssued
	Seq   uint64
}

// Outcome says what a write did with one row.
type Outcome int

const (
	// Inserted: the row was written (ACTIVE or INACTIVE).
	Inserted Outcome = iota
	// Existing: a row with this token digest was already there (redelivery,
	// replay): nothing changed.
	Existing
	// Conflict: the key already has an older ACTIVE row. Only recovery may
	// deactivate it, so the event goes to the conflict subject.
	Conflict
)

// insertSQL writes a whole batch in one statement.
//
// Each row's state is decided here, not by a later UPDATE: a row is ACTIVE
// only if it is the newest event of its key in the batch (row_number) and no
// newer token of the key is already stored. Everything else is INACTIVE at
// once, so an old event that arrives late, or is replayed, can never become
// ACTIVE over a newer token. An ACTIVE row that meets an older ACTIVE one
// trips the partial unique index; ON CONFLICT DO NOTHING skips it and the
// caller routes it to recovery.
const insertSQL = `
WITH batch AS (
	SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::text[],
	                     $6::text[], $7::timestamptz[], $8::timestamptz[], $9::bigint[], $10::text[])
	    AS b(token_digest, refresh_digest, client_id, subject, scope,
	         grant_type, issued_at, expires_at, stream_seq, instance)
), ranked AS (
	SELECT b.*, row_number() OVER (PARTITION BY client_id, subject, scope ORDER BY stream_seq DESC) AS rn
	FROM batch b
)
INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
                    grant_type, issued_at, expires_at, stream_seq, instance, persisted_at)
SELECT r.token_digest, r.refresh_digest, r.client_id, r.subject, r.scope,
       CASE WHEN r.rn = 1 AND NOT EXISTS (
                SELECT 1 FROM tokens t
                WHERE t.client_id = r.client_id AND t.subject = r.subject AND t.scope = r.scope
                  AND t.stream_seq > r.stream_seq)
            THEN 'ACTIVE' ELSE 'INACTIVE' END,
       r.grant_type, r.issued_at, r.expires_at, r.stream_seq, r.instance,
       clock_timestamp() -- now() would be the transaction's start, hiding the batch wait
FROM ranked r
ON CONFLICT DO NOTHING
RETURNING token_digest`

const existingSQL = `SELECT token_digest FROM tokens WHERE token_digest = ANY($1::bytea[])`

// WriteBatch writes rows in one transaction and reports each row's outcome,
// in the order of rows. Rows must have distinct token digests.
func WriteBatch(ctx context.Context, db Beginner, rows []Row) ([]Outcome, error) {
	n := len(rows)
	var (
		digests  = make([][]byte, n)
		refresh  = make([][]byte, n)
		clients  = make([]string, n)
		subjects = make([]string, n)
		scopes   = make([]string, n)
		grants   = make([]string, n)
		issued   = make([]time.Time, n)
		expires  = make([]time.Time, n)
		seqs     = make([]int64, n)
		inst     = make([]string, n)
	)
	for i, r := range rows {
		e := r.Event
		digests[i] = e.TokenDigest[:]
		if e.RefreshDigest != nil {
			refresh[i] = e.RefreshDigest[:]
		}
		clients[i], subjects[i], scopes[i] = e.ClientID, e.Subject, e.Scope()
		grants[i], issued[i], expires[i] = e.GrantType, e.IssuedAt, e.ExpiresAt
		seqs[i], inst[i] = int64(r.Seq), e.Instance
	}
	out := make([]Outcome, n)
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		inserted, err := digestSet(ctx, tx, insertSQL, digests, refresh, clients, subjects, scopes, grants, issued, expires, seqs, inst)
		if err != nil {
			return fmt.Errorf("insert batch of %d: %w", n, err)
		}
		if len(inserted) == n {
			return nil
		}
		var missing [][]byte
		for _, d := range digests {
			if _, ok := inserted[string(d)]; !ok {
				missing = append(missing, d)
			}
		}
		// A separate statement takes a fresh snapshot, so it also sees rows
		// that a concurrent transaction committed while our insert waited.
		existing, err := digestSet(ctx, tx, existingSQL, missing)
		if err != nil {
			return fmt.Errorf("look up %d skipped rows: %w", len(missing), err)
		}
		for i, d := range digests {
			switch _, ins := inserted[string(d)]; {
			case ins:
				out[i] = Inserted
			case existing[string(d)]:
				out[i] = Existing
			default:
				out[i] = Conflict
			}
		}
		return nil
	})
	return out, err
}

// Beginner is what WriteBatch needs: a pool or a connection.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

func digestSet(ctx context.Context, tx pgx.Tx, sql string, args ...any) (map[string]bool, error) {
	rows, err := tx.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	set := map[string]bool{}
	for rows.Next() {
		var d []byte
		if err := rows.Scan(&d); err != nil {
			return nil, err
		}
		set[string(d)] = true
	}
	return set, rows.Err()
}
