package recovery

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/revoke"
)

// lockKeysSQL reads every row of the given keys that matters to the rule,
// locking the ACTIVE ones so no other recovery transaction can deactivate them
// under us. Locks are taken in key order to avoid deadlocks between workers.
const lockKeysSQL = `
WITH keys AS (
	SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(client_id, subject, scope)
)
SELECT t.client_id, t.subject, t.scope, t.token_digest, t.stream_seq
FROM tokens t JOIN keys k USING (client_id, subject, scope)
WHERE t.state = 'ACTIVE'
ORDER BY t.client_id COLLATE "C", t.subject COLLATE "C", t.scope COLLATE "C"
FOR UPDATE OF t`

const maxSeqSQL = `
WITH keys AS (
	SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(client_id, subject, scope)
)
SELECT k.client_id, k.subject, k.scope,
       (SELECT max(t.stream_seq) FROM tokens t
        WHERE t.client_id = k.client_id AND t.subject = k.subject AND t.scope = k.scope)
FROM keys k`

const deactivateSQL = `
UPDATE tokens SET state = 'INACTIVE', state_changed_at = now()
WHERE token_digest = ANY($1::bytea[]) AND state = 'ACTIVE'`

// insertSQL writes a token covered by a family or grant revocation as
// REVOKED: the older row it supersedes is still deactivated, so the newest
// token decides the key whichever order revocation and conflict meet.
//
// It never uses DO NOTHING on the partial unique index: if another
// transaction activated a token for the key since we read it, the insert
// fails, the whole transaction (our UPDATE included) rolls back, and the
// retry reads the new state. Nothing is half-applied.
var insertSQL = `
INSERT INTO tokens (token_digest, refresh_digest, client_id, subject, scope, state,
                    grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at,
                    persisted_at)
SELECT b.token_digest, b.refresh_digest, b.client_id, b.subject, b.scope,
       CASE WHEN ` + revoke.CoveredSQL("b.family_id", "b.client_id", "b.subject", "b.stream_seq") + ` THEN 'REVOKED'
            ELSE b.state END,
       b.grant_type, b.issued_at, b.expires_at, b.stream_seq, b.instance, b.family_id, b.refresh_expires_at,
       clock_timestamp()
FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::timestamptz[], $9::timestamptz[], $10::bigint[], $11::text[],
            $12::bytea[], $13::timestamptz[])
    AS b(token_digest, refresh_digest, client_id, subject, scope, state,
         grant_type, issued_at, expires_at, stream_seq, instance, family_id, refresh_expires_at)
ON CONFLICT (token_digest) DO NOTHING`

// resolveTx runs the whole rule for a batch in tx. notify is called with the
// rows about to be deactivated before the transaction commits; if it fails,
// nothing is written.
func resolveTx(ctx context.Context, tx pgx.Tx, incoming []Incoming, notify func([]Superseded) error) (Decision, error) {
	if err := revoke.LockShared(ctx, tx); err != nil {
		return Decision{}, err
	}
	var digests [][]byte
	for _, in := range incoming {
		digests = append(digests, in.Event.TokenDigest[:])
	}
	known, err := existingDigests(ctx, tx, digests)
	if err != nil {
		return Decision{}, err
	}
	var fresh []Incoming
	for _, in := range incoming {
		if !known[in.Event.TokenDigest] {
			fresh = append(fresh, in)
		}
	}
	if len(fresh) == 0 {
		return Decision{}, nil
	}
	var cl, sb, sc []string
	for _, in := range fresh {
		k := KeyOf(in.Event)
		cl, sb, sc = append(cl, k.ClientID), append(sb, k.Subject), append(sc, k.Scope)
	}
	stored := map[Key]Stored{}
	rows, err := tx.Query(ctx, lockKeysSQL, cl, sb, sc)
	if err != nil {
		return Decision{}, fmt.Errorf("lock active rows: %w", err)
	}
	for rows.Next() {
		var k Key
		var d []byte
		var seq *int64
		if err := rows.Scan(&k.ClientID, &k.Subject, &k.Scope, &d, &seq); err != nil {
			return Decision{}, err
		}
		st := stored[k]
		st.Active = &ActiveRow{Digest: events.Digest(d), Seq: uint64(deref(seq))}
		stored[k] = st
	}
	if err := rows.Err(); err != nil {
		return Decision{}, fmt.Errorf("lock active rows: %w", err)
	}
	rows, err = tx.Query(ctx, maxSeqSQL, cl, sb, sc)
	if err != nil {
		return Decision{}, fmt.Errorf("read newest sequences: %w", err)
	}
	for rows.Next() {
		var k Key
		var seq *int64
		if err := rows.Scan(&k.ClientID, &k.Subject, &k.Scope, &seq); err != nil {
			return Decision{}, err
		}
		st := stored[k]
		st.MaxSeq = uint64(deref(seq))
		stored[k] = st
	}
	if err := rows.Err(); err != nil {
		return Decision{}, fmt.Errorf("read newest sequences: %w", err)
	}

	d := Resolve(stored, fresh)
	if len(d.Deactivate) > 0 {
		var deact [][]byte
		for _, s := range d.Deactivate {
			deact = append(deact, s.Digest[:])
		}
		if _, err := tx.Exec(ctx, deactivateSQL, deact); err != nil {
			return Decision{}, fmt.Errorf("deactivate %d rows: %w", len(deact), err)
		}
		// Tell gateways before the commit: a notice for a deactivation that
		// then rolls back only costs them a cache miss, while a deactivation
		// without a notice would leave a dead token cached.
		if err := notify(d.Deactivate); err != nil {
			return Decision{}, fmt.Errorf("publish deactivation notices: %w", err)
		}
	}
	if err := insertPlaced(ctx, tx, d.Insert); err != nil {
		return Decision{}, err
	}
	return d, nil
}

func insertPlaced(ctx context.Context, tx pgx.Tx, placed []Placed) error {
	n := len(placed)
	var (
		digests, refresh         = make([][]byte, n), make([][]byte, n)
		clients, subjects, scope = make([]string, n), make([]string, n), make([]string, n)
		states, grants, inst     = make([]string, n), make([]string, n), make([]string, n)
		issued, expires          = make([]time.Time, n), make([]time.Time, n)
		seqs                     = make([]int64, n)
		families                 = make([][]byte, n)
		refExp                   = make([]*time.Time, n)
	)
	for i, p := range placed {
		e := p.Event
		digests[i] = e.TokenDigest[:]
		if e.RefreshDigest != nil {
			refresh[i] = e.RefreshDigest[:]
		}
		clients[i], subjects[i], scope[i] = e.ClientID, e.Subject, e.Scope()
		states[i] = "INACTIVE"
		if p.Active {
			states[i] = "ACTIVE"
		}
		grants[i], inst[i] = e.GrantType, e.Instance
		issued[i], expires[i], seqs[i] = e.IssuedAt, e.ExpiresAt, int64(p.Seq)
		refExp[i] = e.RefreshExpiresAt
		if e.FamilyID != nil {
			families[i] = e.FamilyID[:]
		}
	}
	_, err := tx.Exec(ctx, insertSQL, digests, refresh, clients, subjects, scope, states, grants, issued, expires, seqs, inst, families, refExp)
	if err != nil {
		return fmt.Errorf("insert %d resolved rows: %w", n, err)
	}
	return nil
}

func existingDigests(ctx context.Context, tx pgx.Tx, digests [][]byte) (map[events.Digest]bool, error) {
	rows, err := tx.Query(ctx, `SELECT token_digest FROM tokens WHERE token_digest = ANY($1::bytea[])`, digests)
	if err != nil {
		return nil, fmt.Errorf("look up digests: %w", err)
	}
	out := map[events.Digest]bool{}
	for rows.Next() {
		var d []byte
		if err := rows.Scan(&d); err != nil {
			return nil, err
		}
		out[events.Digest(d)] = true
	}
	return out, rows.Err()
}

func deref(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}
