// The batch write: the persister's path from a batch of events to rows.

package store

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

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
// A row covered by a family or grant revocation is written REVOKED whatever
// else holds, so a token revoked while queued never becomes ACTIVE.
//
// Each row's state is decided here, not by a later UPDATE: a row is ACTIVE
// only if it is the newest event of its key in the batch (row_number) and no
// newer token of the key is already stored. Everything else is INACTIVE at
// once, so an old event that arrives late, or is replayed, can never become
// ACTIVE over a newer token. An ACTIVE row that meets an older ACTIVE one
// trips the partial unique index; ON CONFLICT DO NOTHING skips it and the
// caller routes it to recovery.
var insertSQL = `
WITH batch AS (
	SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::text[],
	                     $6::text[], $7::timestamptz[], $8::timestamptz[], $9::bigint[], $10::text[],
	                     $11::bytea[], $12::timestamptz[])
	    AS b(token_digest, refresh_digest, client_id, subject, scope,
	         grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at)
), ranked AS (
	SELECT b.*, row_number() OVER (PARTITION BY client_id, subject, scope ORDER BY stream_seq DESC) AS rn
	FROM batch b
)
INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
                    grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at,
                    persisted_at)
SELECT r.token_digest, r.refresh_digest, r.client_id, r.subject, r.scope,
       CASE WHEN ` + CoveredSQL("r.family_id", "r.client_id", "r.subject", "r.stream_seq") + ` THEN 'REVOKED'
            WHEN r.rn = 1 AND NOT EXISTS (
                SELECT 1 FROM tokens t
                WHERE t.client_id = r.client_id AND t.subject = r.subject AND t.scope = r.scope
                  AND t.stream_seq > r.stream_seq)
            THEN 'ACTIVE' ELSE 'INACTIVE' END,
       r.grant_type, r.issued_at, r.expires_at, r.stream_seq, r.instance, r.family_id, r.refresh_expires_at,
       clock_timestamp() -- now() would be the transaction's start, hiding the batch wait
FROM ranked r
-- Key order: concurrent batches that share keys then wait for each other
-- instead of deadlocking, which Postgres would only notice after a second.
-- Bytewise (COLLATE "C"), the order the COPY path sorts its rows in Go.
ORDER BY r.client_id COLLATE "C", r.subject COLLATE "C", r.scope COLLATE "C", r.stream_seq DESC
ON CONFLICT DO NOTHING
RETURNING token_digest, state = 'REVOKED' AND family_id IS NOT NULL, family_id`

// probeSQL finds the rows of a batch that need the careful path: the token is
// already stored (redelivery, replay), or its key has an ACTIVE row or a newer
// row. Every other row is the newest token of a key with no ACTIVE row, which
// is exactly a row that COPY may write as ACTIVE. Index probes only.
//
// The probes are scalar subqueries with LIMIT 1 on purpose: as EXISTS, the
// planner may turn them into a hash join over a sequential scan of the whole
// table when its statistics are stale, which grows with the table. The
// revocation tables are small, so the revocation check may be EXISTS. Rows it
// matches take the careful path, which writes them REVOKED.
var probeSQL = `
SELECT b.i FROM unnest($1::int[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bytea[])
    AS b(i, token_digest, client_id, subject, scope, stream_seq, family_id)
WHERE (SELECT true FROM tokens t WHERE t.token_digest = b.token_digest LIMIT 1)
   OR (SELECT true FROM tokens t
       WHERE t.client_id = b.client_id AND t.subject = b.subject AND t.scope = b.scope
         AND (t.state = 'ACTIVE' OR t.stream_seq > b.stream_seq)
       LIMIT 1)
   OR ` + CoveredSQL("b.family_id", "b.client_id", "b.subject", "b.stream_seq")
var copyColumns = []string{"token_digest", "refresh_digest", "client_id", "subject", "scope", "state",
	"grant_type", "issued_at", "expires_at", "stream_seq", "instance", "family_id", "refresh_expires_at"}

// afterProbe, when set by a test, runs between a batch's probe and its COPY;
// afterFirstWrite after the first statement that wrote rows.
var afterProbe, afterFirstWrite func()

// WriteBatch writes rows in one transaction and reports each row's outcome,
// in the order of rows. Rows must have distinct token digests.
//
// Most rows take the fast path, a binary COPY, as fast as Postgres can load
// rows (fastRows). Rows that may meet a stored token of their key take the
// set-based INSERT that decides each state.
// If a concurrent writer wins a race between the probe and the COPY, the COPY
// fails on a unique index, the transaction rolls back, and the batch is
// written again with every row on the careful path. That race is rare (two
// writers with the same key or token within one batch's probe-to-COPY gap),
// so a savepoint around every COPY, two round trips per batch, cost more
// than the occasional second transaction.
func WriteBatch(ctx context.Context, db Beginner, rows []Row) ([]Outcome, error) {
	out, err := writeBatch(ctx, db, rows, false)
	if errors.Is(err, errLostRace) {
		return writeBatch(ctx, db, rows, true)
	}
	return out, err
}

// errLostRace: the COPY met a token or key a concurrent writer committed
// after the probe.
var errLostRace = errors.New("a concurrent writer stored a row of the batch first")

// writeBatch is one attempt of WriteBatch; allCareful skips the probe and
// the COPY.
func writeBatch(ctx context.Context, db Beginner, rows []Row, allCareful bool) ([]Outcome, error) {
	out := make([]Outcome, len(rows))
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		careful := map[int]bool{}
		if allCareful {
			if err := LockShared(ctx, tx); err != nil {
				return err
			}
			for i := range rows {
				careful[i] = true
			}
		} else {
			var err error
			if careful, err = lockAndProbe(ctx, tx, rows); err != nil {
				return err
			}
			if afterProbe != nil {
				afterProbe()
			}
			fast, inactive := fastRows(rows, careful)
			if len(fast) > 0 {
				if err := copyRows(ctx, tx, rows, fast, inactive); err != nil {
					return err
				}
				for _, i := range fast {
					out[i] = Inserted
				}
				if afterFirstWrite != nil {
					afterFirstWrite()
				}
			}
		}
		var slow []int
		for i := range rows {
			if careful[i] {
				slow = append(slow, i)
			}
		}
		if len(slow) == 0 {
			return nil
		}
		return insertCareful(ctx, tx, rows, slow, out)
	})
	return out, err
}

// fastRows returns, in key order, the rows the COPY writes, and which of
// them it writes INACTIVE: every row of a key none of whose rows the probe
// marked careful. Such a key has no ACTIVE row and no newer one stored, so
// its newest token in the batch is ACTIVE and the others are INACTIVE, as
// the careful INSERT would decide. A key with a careful row takes the
// careful path with all of its rows: fastRows marks them in careful.
//
// The tokens of simultaneous identical requests, and re-issues of a key
// whose first token is still queued, arrive in one batch as a repeated key.
// Sent to the careful path, such a key could deadlock two batches: one that
// COPYed a fresh key k5 and then, in its INSERT, waited for a repeated key
// k1 that the other batch had COPYed, while the other waited in its own
// INSERT for k5. Postgres breaks the cycle only after deadlock_timeout (a
// second), and one batch is retried. Now a key is careful only for what is
// committed (an ACTIVE or newer row, the token itself, a revocation), which
// one batch's probe saw and the other's did not, and the COPY of a key
// with a committed ACTIVE row fails at once instead of waiting.
func fastRows(rows []Row, careful map[int]bool) (fast []int, inactive map[int]bool) {
	type group struct {
		careful bool
		newest  int
	}
	groups := map[Key]*group{}
	for i, r := range rows {
		k := KeyOf(r.Event)
		g, ok := groups[k]
		if !ok {
			g = &group{newest: i}
			groups[k] = g
		}
		g.careful = g.careful || careful[i]
		if r.Seq > rows[g.newest].Seq {
			g.newest = i
		}
	}
	inactive = map[int]bool{}
	for i, r := range rows {
		g := groups[KeyOf(r.Event)]
		switch {
		case g.careful:
			careful[i] = true
		case g.newest != i:
			inactive[i] = true
			fast = append(fast, i)
		default:
			fast = append(fast, i)
		}
	}
	// Same key order as the careful INSERT, so concurrent batches take
	// their index entries in one order.
	slices.SortFunc(fast, func(a, b int) int {
		return cmp.Or(compareKeys(rows[a].Event, rows[b].Event), cmp.Compare(rows[b].Seq, rows[a].Seq))
	})
	return fast, inactive
}

// compareKeys orders keys bytewise, as COLLATE "C" does in insertSQL.
func compareKeys(a, b *events.TokenIssued) int {
	return cmp.Or(strings.Compare(a.ClientID, b.ClientID), strings.Compare(a.Subject, b.Subject), strings.Compare(a.Scope(), b.Scope()))
}

// lockAndProbe takes the revocation fence (shared) and marks the rows that
// must take the careful path, in one round trip.
func lockAndProbe(ctx context.Context, tx pgx.Tx, rows []Row) (map[int]bool, error) {
	careful := map[int]bool{}
	n := len(rows)
	idx, digests := make([]int32, n), make([][]byte, n)
	clients, subjects, scopes, seqs := make([]string, n), make([]string, n), make([]string, n), make([]int64, n)
	families := make([][]byte, n)
	for i, r := range rows {
		families[i] = familyBytes(r.Event)
		e := r.Event
		idx[i], digests[i], seqs[i] = int32(i), e.TokenDigest[:], int64(r.Seq)
		clients[i], subjects[i], scopes[i] = e.ClientID, e.Subject, e.Scope()
	}
	b := &pgx.Batch{}
	b.Queue(lockSharedSQL, fenceID)
	b.Queue(probeSQL, idx, digests, clients, subjects, scopes, seqs, families)
	br := tx.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return nil, fmt.Errorf("take revocation fence: %w", err)
	}
	res, err := br.Query()
	if err != nil {
		return nil, fmt.Errorf("probe batch of %d: %w", n, err)
	}
	for res.Next() {
		var i int32
		if err := res.Scan(&i); err != nil {
			res.Close()
			return nil, err
		}
		careful[int(i)] = true
	}
	res.Close()
	if err := res.Err(); err != nil {
		return nil, fmt.Errorf("probe batch of %d: %w", n, err)
	}
	if err := br.Close(); err != nil {
		return nil, fmt.Errorf("probe batch of %d: %w", n, err)
	}
	return careful, nil
}

// copyRows COPYs the given rows, ACTIVE unless inactive says otherwise. It
// fails with errLostRace if a concurrent transaction took a token or key
// first.
func copyRows(ctx context.Context, tx pgx.Tx, rows []Row, which []int, inactive map[int]bool) error {
	src := make([][]any, len(which))
	for j, i := range which {
		e := rows[i].Event
		state := "ACTIVE"
		if inactive[i] {
			state = "INACTIVE"
		}
		src[j] = []any{e.TokenDigest[:], refreshBytes(e), e.ClientID, e.Subject, e.Scope(), state,
			e.GrantType, e.IssuedAt, e.ExpiresAt, int64(rows[i].Seq), e.Instance, familyBytes(e), e.RefreshExpiresAt}
	}
	_, err := tx.CopyFrom(ctx, pgx.Identifier{"tokens"}, copyColumns, pgx.CopyFromRows(src))
	if err == nil {
		return nil
	}
	if isUniqueViolation(err) {
		return errLostRace
	}
	return fmt.Errorf("copy %d rows: %w", len(which), err)
}

// insertCareful writes the given rows with insertSQL and records outcomes.
func insertCareful(ctx context.Context, tx pgx.Tx, rows []Row, which []int, out []Outcome) error {
	n := len(which)
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
		families = make([][]byte, n)
		refExp   = make([]*time.Time, n)
	)
	for j, i := range which {
		e := rows[i].Event
		digests[j], refresh[j] = e.TokenDigest[:], refreshBytes(e)
		clients[j], subjects[j], scopes[j] = e.ClientID, e.Subject, e.Scope()
		grants[j], issued[j], expires[j] = e.GrantType, e.IssuedAt, e.ExpiresAt
		seqs[j], inst[j] = int64(rows[i].Seq), e.Instance
		families[j], refExp[j] = familyBytes(e), e.RefreshExpiresAt
	}
	inserted, revokedFamilies, err := insertRows(ctx, tx, digests, refresh, clients, subjects, scopes, grants, issued, expires, seqs, inst, families, refExp)
	if err != nil {
		return fmt.Errorf("insert %d rows: %w", n, err)
	}
	if len(revokedFamilies) > 0 {
		if err := revokeFamiliesOf(ctx, tx, revokedFamilies); err != nil {
			return err
		}
	}
	var missing [][]byte
	for _, d := range digests {
		if !inserted[string(d)] {
			missing = append(missing, d)
		}
	}
	existing := map[events.Digest]bool{}
	if len(missing) > 0 {
		// A separate statement takes a fresh snapshot, so it also sees rows
		// that a concurrent transaction committed while our insert waited.
		if existing, err = ExistingDigests(ctx, tx, missing); err != nil {
			return fmt.Errorf("skipped rows: %w", err)
		}
	}
	for j, i := range which {
		switch {
		case inserted[string(digests[j])]:
			out[i] = Inserted
		case existing[events.Digest(digests[j])]:
			out[i] = Existing
		default:
			out[i] = Conflict
		}
	}
	return nil
}

// insertRows runs insertSQL and returns the digests it inserted and the
// families of rows it wrote REVOKED.
func insertRows(ctx context.Context, tx pgx.Tx, args ...any) (map[string]bool, [][]byte, error) {
	rows, err := tx.Query(ctx, insertSQL, args...)
	if err != nil {
		return nil, nil, err
	}
	set := map[string]bool{}
	var families [][]byte
	for rows.Next() {
		var d, fam []byte
		var revoked bool
		if err := rows.Scan(&d, &revoked, &fam); err != nil {
			return nil, nil, err
		}
		set[string(d)] = true
		if revoked {
			families = append(families, fam)
		}
	}
	return set, families, rows.Err()
}
