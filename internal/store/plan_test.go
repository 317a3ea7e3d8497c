package store_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// The batch statements that look tokens up by digest must find them through
// the primary key however the table has grown since the connection first ran
// them. A prepared statement's plan is cached: planned on an empty table, a
// lookup of "token_digest = ANY($1)" became a sequential scan that compared
// every row with every digest of the batch, and stayed one as the table grew
// (until autovacuum's first ANALYZE). In the conflict mix that made
// recovery's lookup and deactivation take most of a second per batch of a few
// hundred conflicts at 20k rows, and the time grew with the table.
func TestBatchLookupsUseThePrimaryKeyAfterTheTableGrew(t *testing.T) {
	url, _ := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pool := oneConnection(ctx, t, url)

	digests := func(n int) [][]byte {
		out := make([][]byte, n)
		for i := range out {
			out[i] = make([]byte, 32)
			_, _ = rand.Read(out[i])
		}
		return out
	}
	// Events of keys that have rows (u1.. from the growth below) and of new
	// keys, two of them repeated: the batch write takes both of its paths.
	var seq uint64 = 1_000_000
	batch := func() []store.Row {
		var rows []store.Row
		for i := range 200 {
			subject := fmt.Sprintf("u%d", 1+i*50) // stored, ACTIVE: a conflict
			if i%2 == 1 {
				subject = testenv.Name("new_")
			}
			seq++
			rows = append(rows, store.Row{Event: testenv.Token("plan", subject, "read"), Seq: seq})
			if i%50 == 1 {
				seq++
				rows = append(rows, store.Row{Event: testenv.Token("plan", subject, "read"), Seq: seq})
			}
		}
		return rows
	}
	lookups := []struct {
		name string
		run  func(tx pgx.Tx) error
	}{
		{"ExistingDigests", func(tx pgx.Tx) error {
			_, err := store.ExistingDigests(ctx, tx, digests(500))
			return err
		}},
		// Digests without rows: what the statement finds is the point, not
		// what it updates.
		{"Deactivate", func(tx pgx.Tx) error {
			ds := make([]events.Digest, 100)
			for i, d := range digests(len(ds)) {
				ds[i] = events.Digest(d)
			}
			if err := store.Deactivate(ctx, tx, ds); !errors.Is(err, store.ErrNotLocked) {
				return fmt.Errorf("deactivate rows that are not there: %v", err)
			}
			return nil
		}},
		// The transaction stands in for the pool: the write runs in a
		// savepoint of it.
		{"WriteBatch", func(tx pgx.Tx) error {
			_, err := store.WriteBatch(ctx, tx, batch())
			return err
		}},
		// Recovery's round: lock the keys' ACTIVE rows, deactivate them,
		// write the newer tokens.
		{"LockKeys, Deactivate, InsertResolved", func(tx pgx.Tx) error {
			rows := batch()
			// Older ACTIVE tokens of the same keys first (on the grown
			// table, keys that have one already skip theirs), so the round
			// has rows to lock and deactivate on the empty table too.
			older := make([]store.Row, len(rows))
			active := make([]bool, len(rows))
			keys := make([]store.Key, len(rows))
			for i, r := range rows {
				older[i] = store.Row{Event: testenv.Token(r.Event.ClientID, r.Event.Subject, "read"), Seq: r.Seq - 500_000}
				active[i] = i == 0 || store.KeyOf(rows[i-1].Event) != store.KeyOf(r.Event)
				keys[i] = store.KeyOf(r.Event)
			}
			if _, err := store.InsertResolved(ctx, tx, older, active); err != nil {
				return err
			}
			stored, err := store.LockKeys(ctx, tx, keys)
			if err != nil {
				return err
			}
			var locked []events.Digest
			for _, st := range stored {
				if st.Active != nil {
					locked = append(locked, st.Active.Digest)
				}
			}
			if err := store.Deactivate(ctx, tx, locked); err != nil {
				return err
			}
			_, err = store.InsertResolved(ctx, tx, rows, make([]bool, len(rows)))
			return err
		}},
	}
	// Warm the connection's statement cache on the empty table (Postgres
	// settles on a generic plan after five executions); every warm-up rolls
	// back, so the table stays empty, and no ANALYZE may replan meanwhile.
	_, err := pool.Exec(ctx, `ALTER TABLE tokens SET (autovacuum_enabled = off)`)
	testenv.Must(t, err, "keep autovacuum away")
	for _, l := range lookups {
		for range 8 {
			tx, err := pool.Begin(ctx)
			testenv.Must(t, err, "begin")
			testenv.Must(t, l.run(tx), l.name+" on the empty table")
			testenv.Must(t, tx.Rollback(ctx), "roll back")
		}
	}
	_, err = pool.Exec(ctx, `
INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
SELECT sha256(i::text::bytea), 'plan', 'u' || i, 'read', 'ACTIVE', 'client_credentials', now(), now() + interval '1 hour', i
FROM generate_series(1, 20000) AS i`)
	testenv.Must(t, err, "grow the table")

	for _, l := range lookups {
		var before, after int64
		// The backend's table accesses not yet flushed to the statistics:
		// within one transaction, the difference is the lookup's own.
		const seqScans = `SELECT coalesce(seq_scan, 0) FROM pg_stat_xact_user_tables WHERE relname = 'tokens'`
		tx, err := pool.Begin(ctx)
		testenv.Must(t, err, "begin")
		testenv.Must(t, tx.QueryRow(ctx, seqScans).Scan(&before), "read statistics")
		testenv.Must(t, l.run(tx), l.name+" on the grown table")
		testenv.Must(t, tx.QueryRow(ctx, seqScans).Scan(&after), "read statistics")
		testenv.Must(t, tx.Rollback(ctx), "roll back")
		if scans := after - before; scans != 0 {
			t.Errorf("%s scanned the whole table (%d sequential scans) instead of probing its indexes", l.name, scans)
		}
	}
}

// oneConnection is a pool of one connection: the one whose statement cache
// a test warms.
func oneConnection(ctx context.Context, t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	testenv.Must(t, err, "parse database URL")
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	testenv.Must(t, err, "connect")
	t.Cleanup(pool.Close)
	return pool
}

// Cleanup's delete batches find their rows by ctid, a TID scan, however the
// table has grown since the connection first ran them; a plan cached while
// the table was small scanned the whole table for every batch.
func TestCleanupBatchesUseATIDScanAfterTheTableGrew(t *testing.T) {
	url, _ := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pool := oneConnection(ctx, t, url)
	_, err := pool.Exec(ctx, `ALTER TABLE tokens SET (autovacuum_enabled = off)`)
	testenv.Must(t, err, "keep autovacuum away")

	policy := store.DefaultRetryPolicy()
	cutoff := time.Now().Add(-time.Hour)
	for range 8 {
		_, _, err := store.DeleteExpired(ctx, pool, policy, store.TableTokens, cutoff, time.Time{}, 100)
		testenv.Must(t, err, "cleanup on the empty table")
	}
	// 20k rows, 500 of them long expired.
	_, err = pool.Exec(ctx, `
INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
SELECT sha256(i::text::bytea), 'plan', 'u' || i, 'read', 'INACTIVE', 'client_credentials', now(),
       CASE WHEN i <= 500 THEN now() - interval '1 day' ELSE now() + interval '1 hour' END, i
FROM generate_series(1, 20000) AS i`)
	testenv.Must(t, err, "grow the table")

	// The backend's statistics reach pg_stat_user_tables when it goes idle
	// after a forced flush; the connection is the only one.
	seqScans := func() int64 {
		_, err := pool.Exec(ctx, `SELECT pg_stat_force_next_flush()`)
		testenv.Must(t, err, "flush statistics")
		var n int64
		testenv.Must(t, pool.QueryRow(ctx, `SELECT coalesce(seq_scan, 0) FROM pg_stat_user_tables WHERE relname = 'tokens'`).Scan(&n), "read statistics")
		return n
	}
	before := seqScans()
	n, _, err := store.DeleteExpired(ctx, pool, policy, store.TableTokens, cutoff, time.Time{}, 100)
	testenv.Must(t, err, "cleanup on the grown table")
	if n != 100 {
		t.Fatalf("deleted %d rows, want a batch of 100", n)
	}
	if scans := seqScans() - before; scans != 0 {
		t.Errorf("a cleanup batch scanned the whole table (%d sequential scans) instead of deleting by ctid", scans)
	}
}
