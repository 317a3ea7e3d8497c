// Conflict resolution: what recovery reads and writes to apply its rule (the
// rule itself is recovery.Resolve). The caller runs these in one transaction
// after LockShared.

package store

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

// ActiveRow identifies a key's ACTIVE row.
type ActiveRow struct {
	Digest events.Digest
	Seq    uint64
}

// KeyState is what the database holds for a key.
type KeyState struct {
	// Active is the key's ACTIVE row, if any.
	Active *ActiveRow
	// MaxSeq is the highest stream sequence of any row of the key, whatever
	// its state (0 if none).
	MaxSeq uint64
}

// lockKeysSQL reads the ACTIVE row of each given key and locks it, so no
// other recovery transaction can deactivate it under us. Locks are taken in
// key order (the materialised, sorted keys drive the loop) to avoid deadlocks
// between workers.
//
// One index probe per key, on purpose: as a join of the keys with tokens,
// the planner may choose a hash join over every ACTIVE row of the table when
// its statistics lag the table's growth, which costs milliseconds per batch
// and grows with the table.
const lockKeysSQL = `
WITH keys AS MATERIALIZED (
	SELECT * FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(client_id, subject, scope)) d
	ORDER BY client_id COLLATE "C", subject COLLATE "C", scope COLLATE "C"
)
SELECT k.client_id, k.subject, k.scope, a.token_digest, a.stream_seq
FROM keys k CROSS JOIN LATERAL (
	SELECT t.token_digest, t.stream_seq FROM tokens t
	WHERE t.subject = k.subject AND t.client_id = k.client_id AND t.scope = k.scope AND t.state = 'ACTIVE'
	LIMIT 1
	FOR UPDATE
) a`

const maxSeqSQL = `
WITH keys AS (
	SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(client_id, subject, scope)
)
SELECT k.client_id, k.subject, k.scope,
       (SELECT max(t.stream_seq) FROM tokens t
        WHERE t.client_id = k.client_id AND t.subject = k.subject AND t.scope = k.scope)
FROM keys k`

// deactivateSQL is only used on rows lockKeysSQL returned: they are ACTIVE
// and locked by this transaction, so the primary key alone finds them and
// their ctid cannot change before the update.
//
// One primary-key probe per digest, then the rows by ctid, planned each
// time (planEachTime): as "token_digest = ANY($1)" or as a join with the
// digests, a cached plan was a sequential scan of the whole table per batch.
const deactivateSQL = `
UPDATE tokens SET state = 'INACTIVE', state_changed_at = now()
WHERE ctid = ANY(ARRAY(
	SELECT (SELECT t.ctid FROM tokens t WHERE t.token_digest = d.digest)
	FROM unnest($1::bytea[]) AS d(digest)))`

// insertResolvedSQL writes a token covered by a family or grant revocation
// as REVOKED: the older row it supersedes is still deactivated, so the
// newest token decides the key whichever order revocation and conflict meet.
// It returns the families of the rows it wrote REVOKED, which the caller
// revokes as the batch write does (revokeFamiliesOf).
//
// DO NOTHING covers the partial unique index too: if another transaction
// activated a token for a key since we read it (a key that had no ACTIVE row
// then, so we deactivated nothing of it), the row is skipped and reported,
// and the caller resolves that key again in the same transaction with the
// new row locked. A failed insert would roll back the whole batch instead,
// and under a stream of re-issues the retried (and grown) batch met the next
// such race, which held the conflict-heavy mix at about 1,000 tokens/s.
var insertResolvedSQL = `
INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
                    grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at,
                    persisted_at)
SELECT b.token_digest, b.refresh_digest, b.client_id, b.subject, b.scope,
       CASE WHEN ` + CoveredSQL("b.family_id", "b.client_id", "b.subject", "b.stream_seq") + ` THEN 'REVOKED'
            ELSE b.state END,
       b.grant_type, b.issued_at, b.expires_at, b.stream_seq, b.instance, b.family_id, b.refresh_expires_at,
       clock_timestamp()
FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::text[],
            $12::bytea[], $13::timestamptz[])
    AS b(token_digest, refresh_digest, client_id, subject, scope, state,
         grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at)
ON CONFLICT DO NOTHING
RETURNING token_digest, state = 'REVOKED' AND family_id IS NOT NULL, family_id`

// LockKeys locks the ACTIVE rows of the keys and reads each key's newest
// stream sequence. Keys without rows are absent from the map.
func LockKeys(ctx context.Context, tx pgx.Tx, keys []Key) (map[Key]KeyState, error) {
	var cl, sb, sc []string
	for _, k := range keys {
		cl, sb, sc = append(cl, k.ClientID), append(sb, k.Subject), append(sc, k.Scope)
	}
	stored := map[Key]KeyState{}
	rows, err := tx.Query(ctx, lockKeysSQL, cl, sb, sc)
	if err != nil {
		return nil, fmt.Errorf("lock active rows: %w", err)
	}
	for rows.Next() {
		var k Key
		var d []byte
		var seq *int64
		if err := rows.Scan(&k.ClientID, &k.Subject, &k.Scope, &d, &seq); err != nil {
			return nil, err
		}
		st := stored[k]
		st.Active = &ActiveRow{Digest: events.Digest(d), Seq: uint64(deref(seq))}
		stored[k] = st
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("lock active rows: %w", err)
	}
	rows, err = tx.Query(ctx, maxSeqSQL, cl, sb, sc)
	if err != nil {
		return nil, fmt.Errorf("read newest sequences: %w", err)
	}
	for rows.Next() {
		var k Key
		var seq *int64
		if err := rows.Scan(&k.ClientID, &k.Subject, &k.Scope, &seq); err != nil {
			return nil, err
		}
		st := stored[k]
		st.MaxSeq = uint64(deref(seq))
		stored[k] = st
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read newest sequences: %w", err)
	}
	return stored, nil
}

// Deactivate makes the given rows INACTIVE: ACTIVE rows this transaction
// locked with LockKeys.
func Deactivate(ctx context.Context, tx pgx.Tx, digests []events.Digest) error {
	raw := make([][]byte, len(digests))
	for i := range digests {
		raw[i] = digests[i][:]
	}
	tag, err := tx.Exec(ctx, deactivateSQL, planEachTime, raw)
	if err != nil {
		return fmt.Errorf("deactivate %d rows: %w", len(raw), err)
	}
	// The rows are locked by this transaction, so each is found by its
	// ctid; one that is not was not locked first, and the rule would be
	// applied to a state nobody read.
	distinct := map[events.Digest]bool{}
	for _, d := range digests {
		distinct[d] = true
	}
	if n := tag.RowsAffected(); n != int64(len(distinct)) {
		return fmt.Errorf("deactivate %d rows: %d updated: %w", len(distinct), n, ErrNotLocked)
	}
	return nil
}

// InsertResolved writes rows with the states the conflict rule gave them
// (active[i] for rows[i]); a row whose digest is already stored is skipped.
// A row covered by a grant revocation is written REVOKED and its family is
// revoked with it, as in WriteBatch: a refresh that raced with the
// revocation may have minted a newer member the watermark does not reach.
// It returns the indices of rows meant ACTIVE that were not written because
// another transaction activated a token of their key meanwhile; the caller
// must resolve them again.
func InsertResolved(ctx context.Context, tx pgx.Tx, rows []Row, active []bool) (lost []int, err error) {
	n := len(rows)
	var (
		digests, refresh         = make([][]byte, n), make([][]byte, n)
		clients, subjects, scope = make([]string, n), make([]string, n), make([]string, n)
		states, grants, inst     = make([]string, n), make([]string, n), make([]string, n)
		issued, expires          = make([]time.Time, n), make([]time.Time, n)
		seqs                     = make([]int64, n)
		families                 = make([][]byte, n)
		refExp                   = make([]*time.Time, n)
	)
	for i, r := range rows {
		e := r.Event
		digests[i], refresh[i] = e.TokenDigest[:], refreshBytes(e)
		clients[i], subjects[i], scope[i] = e.ClientID, e.Subject, e.Scope()
		states[i] = "INACTIVE"
		if active[i] {
			states[i] = "ACTIVE"
		}
		grants[i], inst[i] = e.GrantType, e.Instance
		issued[i], expires[i], seqs[i] = e.IssuedAt, e.ExpiresAt, int64(r.Seq)
		families[i], refExp[i] = familyBytes(e), e.RefreshExpiresAt
	}
	res, err := tx.Query(ctx, insertResolvedSQL, digests, refresh, clients, subjects, scope, states, grants, issued, expires, seqs, inst, families, refExp)
	if err != nil {
		return nil, fmt.Errorf("insert %d resolved rows: %w", n, err)
	}
	var revoked [][]byte
	inserted := make(map[string]bool, n)
	for res.Next() {
		var d, fam []byte
		var isRevoked bool
		if err := res.Scan(&d, &isRevoked, &fam); err != nil {
			res.Close()
			return nil, fmt.Errorf("insert %d resolved rows: %w", n, err)
		}
		inserted[string(d)] = true
		if isRevoked {
			revoked = append(revoked, fam)
		}
	}
	if err := res.Err(); err != nil {
		return nil, fmt.Errorf("insert %d resolved rows: %w", n, err)
	}
	if len(revoked) > 0 {
		if err := revokeFamiliesOf(ctx, tx, revoked); err != nil {
			return nil, err
		}
	}
	// A skipped row lost to a stored digest (nothing to do) or, meant
	// ACTIVE, to a key activated meanwhile (resolve again). A separate
	// statement takes a fresh snapshot and sees what the insert waited for.
	var skipped [][]byte
	for i := range rows {
		if !inserted[string(digests[i])] {
			skipped = append(skipped, digests[i])
		}
	}
	if len(skipped) == 0 {
		return nil, nil
	}
	existing, err := ExistingDigests(ctx, tx, skipped)
	if err != nil {
		return nil, fmt.Errorf("rows skipped by the resolved insert: %w", err)
	}
	var odd []int // skipped, not stored: only the key's index may explain it
	for i := range rows {
		if !inserted[string(digests[i])] && !existing[rows[i].Event.TokenDigest] {
			odd = append(odd, i)
		}
	}
	if len(odd) == 0 {
		return nil, nil
	}
	activeKeys, err := keysWithActiveRow(ctx, tx, rows, odd)
	if err != nil {
		return nil, err
	}
	for _, i := range odd {
		if !active[i] || !activeKeys[i] {
			// Another unique index refused it (its refresh digest is another
			// token's): retrying cannot help.
			return nil, fmt.Errorf("resolved row %s refused by a unique index other than its token's or its key's", rows[i].Event.TokenDigest)
		}
		lost = append(lost, i)
	}
	return lost, nil
}

// keysWithActiveRow reports which of rows[which] have a key with an ACTIVE
// row now: one index probe per row (see lockKeysSQL on why not a join).
func keysWithActiveRow(ctx context.Context, tx pgx.Tx, rows []Row, which []int) (map[int]bool, error) {
	n := len(which)
	idx := make([]int32, n)
	clients, subjects, scopes := make([]string, n), make([]string, n), make([]string, n)
	for j, i := range which {
		e := rows[i].Event
		idx[j], clients[j], subjects[j], scopes[j] = int32(i), e.ClientID, e.Subject, e.Scope()
	}
	res, err := tx.Query(ctx, `
SELECT k.i FROM unnest($1::int[], $2::text[], $3::text[], $4::text[]) AS k(i, client_id, subject, scope)
WHERE (SELECT true FROM tokens t
       WHERE t.subject = k.subject AND t.client_id = k.client_id AND t.scope = k.scope AND t.state = 'ACTIVE'
       LIMIT 1)`, idx, clients, subjects, scopes)
	if err != nil {
		return nil, fmt.Errorf("keys of skipped rows: %w", err)
	}
	defer res.Close()
	out := make(map[int]bool, n)
	for res.Next() {
		var i int32
		if err := res.Scan(&i); err != nil {
			return nil, fmt.Errorf("keys of skipped rows: %w", err)
		}
		out[int(i)] = true
	}
	return out, res.Err()
}

func deref(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}
