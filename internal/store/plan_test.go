package store_test

import (
	"context"
	"crypto/rand"
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
	cfg, err := pgxpool.ParseConfig(url)
	testenv.Must(t, err, "parse database URL")
	cfg.MaxConns = 1 // one connection: the one whose statement cache is warmed
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	testenv.Must(t, err, "connect")
	defer pool.Close()

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
	client := "warm" // the warm-up's keys are not the grown table's
	batch := func() []store.Row {
		var rows []store.Row
		for i := range 200 {
			subject := fmt.Sprintf("u%d", 1+i*50) // stored, ACTIVE: a conflict
			if i%2 == 1 {
				subject = testenv.Name("new_")
			}
			seq++
			rows = append(rows, store.Row{Event: testenv.Token(client, subject, "read"), Seq: seq})
			if i%50 == 1 {
				seq++
				rows = append(rows, store.Row{Event: testenv.Token(client, subject, "read"), Seq: seq})
			}
		}
		return rows
	}
	lookups := map[string]func(tx pgx.Tx, d [][]byte) error{
		// The transaction stands in for the pool: the write runs in a
		// savepoint of it.
		"WriteBatch": func(tx pgx.Tx, _ [][]byte) error {
			_, err := store.WriteBatch(ctx, tx, batch())
			return err
		},
		"LockKeys and InsertResolved": func(tx pgx.Tx, _ [][]byte) error {
			rows := batch()
			keys := make([]store.Key, len(rows))
			active := make([]bool, len(rows))
			for i, r := range rows {
				keys[i] = store.KeyOf(r.Event)
			}
			if _, err := store.LockKeys(ctx, tx, keys); err != nil {
				return err
			}
			_, err := store.InsertResolved(ctx, tx, rows, active)
			return err
		},
		"ExistingDigests": func(tx pgx.Tx, d [][]byte) error {
			_, err := store.ExistingDigests(ctx, tx, d)
			return err
		},
		"Deactivate": func(tx pgx.Tx, d [][]byte) error {
			ds := make([]events.Digest, len(d))
			for i := range d {
				ds[i] = events.Digest(d[i])
			}
			return store.Deactivate(ctx, tx, ds)
		},
	}
	// Warm the connection's statement cache on the empty table: Postgres
	// settles on a generic plan after five executions.
	for name, lookup := range lookups {
		for range 8 {
			testenv.Must(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return lookup(tx, digests(100)) }), name+" on the empty table")
		}
	}
	_, err = pool.Exec(ctx, `
INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at, expires_at, stream_seq)
SELECT sha256(i::text::bytea), 'plan', 'u' || i, 'read', 'ACTIVE', 'client_credentials', now(), now() + interval '1 hour', i
FROM generate_series(1, 20000) AS i`)
	testenv.Must(t, err, "grow the table")
	client = "plan"

	for name, lookup := range lookups {
		var before, after int64
		// The backend's table accesses not yet flushed to the statistics:
		// within one transaction, the difference is the lookup's own.
		const seqScans = `SELECT coalesce(seq_scan, 0) FROM pg_stat_xact_user_tables WHERE relname = 'tokens'`
		testenv.Must(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := tx.QueryRow(ctx, seqScans).Scan(&before); err != nil {
				return err
			}
			if err := lookup(tx, digests(500)); err != nil {
				return err
			}
			return tx.QueryRow(ctx, seqScans).Scan(&after)
		}), name+" on the grown table")
		if scans := after - before; scans != 0 {
			t.Errorf("%s scanned the whole table (%d sequential scans) instead of probing its primary key", name, scans)
		}
	}
}

// Cleanup's delete batches find their rows by ctid, a TID scan, however the
// table has grown since the connection first ran them; a plan cached while
// the table was small scanned the whole table for every batch.
func TestCleanupBatchesUseATIDScanAfterTheTableGrew(t *testing.T) {
	url, _ := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := pgxpool.ParseConfig(url)
	testenv.Must(t, err, "parse database URL")
	cfg.MaxConns = 1 // one connection: the one whose statement cache is warmed
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	testenv.Must(t, err, "connect")
	defer pool.Close()

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
