// Package store owns every SQL statement the pipeline runs on the token
// tables (tokens, revoked_families, revoked_grants, refresh_rotations): the
// batch write, conflict resolution, revocation, cleanup, and the
// classification of Postgres errors into retry, data and operational faults.
// A schema change touches this package and the migrations, nothing else.
//
// Files by concern: write.go (the persister's batch write), conflict.go
// (recovery's reads and writes), sync.go (the issuer's sync-mode write),
// issuerread.go (the issuer's status reads and refresh rotations), revoke.go
// (revocations and their fence), cleanup.go (expiry deletes), report.go
// (operator reads: grants, audit, status), retry.go (error classification
// and retries).
package store

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

// Beginner starts transactions: a pool or a connection. Every writer takes
// one, so tests may pass a single connection.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Row is one TokenIssued event with the stream sequence JetStream gave it on
// the issued subject. Ordering between tokens of a key depends on that
// sequence alone, so a copy (conflict, dead letter, replay) carries the
// original sequence, never its own.
type Row struct {
	Event *events.TokenIssued
	Seq   uint64
}

// Key is the one-ACTIVE-token key, exactly the columns of the partial unique
// index: looking rows up with fewer columns is how WSO2's recovery missed the
// rows that blocked it.
type Key struct {
	ClientID, Subject, Scope string
}

// KeyOf returns the key of an event.
func KeyOf(e *events.TokenIssued) Key {
	return Key{ClientID: e.ClientID, Subject: e.Subject, Scope: e.Scope()}
}

// existingSQL probes the primary key once per digest and runs planned each
// time: as "token_digest = ANY($1)" under a cached plan it was a sequential
// scan (see planEachTime).
const existingSQL = `
SELECT d.digest FROM unnest($1::bytea[]) AS d(digest)
WHERE (SELECT true FROM tokens t WHERE t.token_digest = d.digest)`

// planEachTime is how the statements that take a whole batch of digests run:
// Postgres plans them on every execution, for the table as it is now. By
// default pgx prepares a statement once per connection, and after five
// executions Postgres keeps a generic plan for it. Planned while the table
// was nearly empty (a new deployment, every benchmark), the plan of a batch
// lookup was a sequential scan, and it stayed one as the table grew, until
// autovacuum's first ANALYZE: with every row compared with every digest of
// the batch, recovery's lookup and deactivation took most of a second per
// batch at 20k rows in the conflict mix, growing with the table. Planning
// costs a fraction of a millisecond, once per batch.
const planEachTime = pgx.QueryExecModeCacheDescribe

// ExistingDigests returns which of the digests have a row. As a statement of
// its own it takes a fresh snapshot, so inside a read-committed transaction
// it also sees rows that concurrent transactions committed meanwhile.
func ExistingDigests(ctx context.Context, tx pgx.Tx, digests [][]byte) (map[events.Digest]bool, error) {
	rows, err := tx.Query(ctx, existingSQL, planEachTime, digests)
	if err != nil {
		return nil, fmt.Errorf("look up %d digests: %w", len(digests), err)
	}
	out := map[events.Digest]bool{}
	for rows.Next() {
		var d []byte
		if err := rows.Scan(&d); err != nil {
			return nil, fmt.Errorf("look up %d digests: %w", len(digests), err)
		}
		out[events.Digest(d)] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("look up %d digests: %w", len(digests), err)
	}
	return out, nil
}

// LookupDigests returns which of the digests already have a row. It only reads.
func LookupDigests(ctx context.Context, db Beginner, digests []events.Digest) (map[events.Digest]bool, error) {
	var out map[events.Digest]bool
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		var err error
		out, err = ExistingDigests(ctx, tx, rawDigests(digests))
		return err
	})
	return out, err
}

// familyBytes is the family column of an event: NULL when absent.
func familyBytes(e *events.TokenIssued) []byte {
	if e.FamilyID == nil {
		return nil
	}
	return e.FamilyID[:]
}

// refreshBytes is the refresh_digest column of an event: NULL when absent.
func refreshBytes(e *events.TokenIssued) []byte {
	if e.RefreshDigest == nil {
		return nil
	}
	return e.RefreshDigest[:]
}
