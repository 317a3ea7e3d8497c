package cleanup_test

import (
	"context"
	"crypto/rand"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/internal/cleanup"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// row is a token row fixture. Times are relative to now; a zero refresh
// means no refresh token.
type row struct {
	name    string
	state   string
	expires time.Duration  // access token expiry, from now
	refresh *time.Duration // refresh token expiry, from now; nil for none
	family  bool
}

func ago(d time.Duration) time.Duration       { return -d }
func in(d time.Duration) time.Duration        { return d }
func ref(d time.Duration) *time.Duration      { return &d }
func random(n int) []byte                     { b := make([]byte, n); _, _ = rand.Read(b); return b }
func noPause(c cleanup.Config) cleanup.Config { c.Pause = -1; return c }

var seq atomic.Int64

// insert writes fixture rows with plain SQL and returns their digests by name.
func insert(t *testing.T, pool *pgxpool.Pool, rows ...row) map[string][]byte {
	t.Helper()
	now := time.Now()
	out := map[string][]byte{}
	for _, r := range rows {
		digest := random(32)
		var refreshDigest, family []byte
		var refreshExpires *time.Time
		if r.refresh != nil {
			refreshDigest = random(32)
			at := now.Add(*r.refresh)
			refreshExpires = &at
		}
		if r.family {
			family = random(16)
		}
		n := seq.Add(1)
		_, err := pool.Exec(context.Background(), `
			INSERT INTO tokens (token_digest, client_id, subject, scope, state, grant_type, issued_at,
			                    expires_at, refresh_digest, refresh_expires_at, family_id, stream_seq)
			VALUES ($1, 'client', $2, 'read', $3, 'authorization_code', $4, $5, $6, $7, $8, $9)`,
			digest, "user-"+strconv.FormatInt(n, 10), r.state, now.Add(r.expires-time.Hour), now.Add(r.expires),
			refreshDigest, refreshExpires, family, n)
		testenv.Must(t, err, "insert "+r.name)
		out[r.name] = digest
	}
	return out
}

func exists(t *testing.T, pool *pgxpool.Pool, table, where string, arg any) bool {
	t.Helper()
	var ok bool
	err := pool.QueryRow(context.Background(), `SELECT EXISTS (SELECT 1 FROM `+table+` WHERE `+where+`)`, arg).Scan(&ok)
	testenv.Must(t, err, "look up "+table)
	return ok
}

func count(t *testing.T, pool *pgxpool.Pool, table string) int64 {
	t.Helper()
	var n int64
	testenv.Must(t, pool.QueryRow(context.Background(), `SELECT count(*) FROM `+table).Scan(&n), "count "+table)
	return n
}

func TestPassDeletesExpiredTokensInBatches(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	states := []string{"ACTIVE", "INACTIVE", "REVOKED", "EXPIRED"}
	var rows []row
	for i := range 250 {
		r := row{name: strconv.Itoa(i), state: states[i%4], expires: ago(48*time.Hour + time.Duration(i)*time.Minute)}
		if i%3 == 0 {
			r.refresh, r.family = ref(ago(25*time.Hour+time.Duration(i)*time.Second)), true
		}
		rows = append(rows, r)
	}
	insert(t, pool, rows...)
	keep := insert(t, pool, row{name: "live", state: "ACTIVE", expires: in(time.Hour)})

	var reports []cleanup.Stats
	st, err := cleanup.Pass(ctx, pool, cleanup.Config{BatchSize: 100, Pause: time.Millisecond},
		func(s cleanup.Stats) { reports = append(reports, s) })
	testenv.Must(t, err, "pass")
	if st.Tokens != 250 {
		t.Fatalf("deleted %d token rows, want 250", st.Tokens)
	}
	// 100 + 100 + 50 token rows, then one (empty) batch per other table.
	if st.Batches < 3+3 {
		t.Fatalf("%d batches for 250 rows in batches of 100, want at least 6", st.Batches)
	}
	if len(reports) != st.Batches || reports[len(reports)-1] != st {
		t.Fatalf("progress reported %d times (last %+v), want %d times ending with %+v", len(reports), reports[len(reports)-1], st.Batches, st)
	}
	for i, r := range reports[:3] {
		if want := min(int64(100*(i+1)), 250); r.Tokens != want {
			t.Fatalf("after batch %d: %d token rows deleted, want %d: a batch must not exceed BatchSize", i+1, r.Tokens, want)
		}
	}
	if n := count(t, pool, "tokens"); n != 1 || !exists(t, pool, "tokens", "token_digest = $1", keep["live"]) {
		t.Fatalf("%d rows left, want only the live one", n)
	}
}

// An unexpired INACTIVE or REVOKED row is what refuses its self-contained
// token; a row whose refresh token is still valid proves the same for the
// refresh token's family. Both must survive, whatever the access token's
// expiry.
func TestPassKeepsRowsThatStillProveSomething(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	keep := insert(t, pool,
		row{name: "active unexpired", state: "ACTIVE", expires: in(time.Hour)},
		row{name: "inactive unexpired", state: "INACTIVE", expires: in(time.Hour)},
		row{name: "revoked unexpired", state: "REVOKED", expires: in(time.Hour), family: true},
		row{name: "inactive expired within retention", state: "INACTIVE", expires: ago(23 * time.Hour)},
		row{name: "revoked, access long expired, refresh valid", state: "REVOKED", expires: ago(100 * time.Hour), refresh: ref(in(600 * time.Hour)), family: true},
		row{name: "inactive, access long expired, refresh valid", state: "INACTIVE", expires: ago(100 * time.Hour), refresh: ref(in(time.Minute)), family: true},
		row{name: "expired, refresh expired within retention", state: "EXPIRED", expires: ago(100 * time.Hour), refresh: ref(ago(23 * time.Hour)), family: true},
	)
	gone := insert(t, pool,
		row{name: "active expired", state: "ACTIVE", expires: ago(25 * time.Hour)},
		row{name: "inactive expired", state: "INACTIVE", expires: ago(48 * time.Hour)},
		row{name: "revoked expired", state: "REVOKED", expires: ago(48 * time.Hour)},
		row{name: "expired expired", state: "EXPIRED", expires: ago(48 * time.Hour)},
		row{name: "both expired", state: "INACTIVE", expires: ago(800 * time.Hour), refresh: ref(ago(25 * time.Hour)), family: true},
	)
	st, err := cleanup.Pass(ctx, pool, noPause(cleanup.DefaultConfig()), nil)
	testenv.Must(t, err, "pass")
	for name, d := range keep {
		if !exists(t, pool, "tokens", "token_digest = $1", d) {
			t.Errorf("row %q was deleted; it must stay", name)
		}
	}
	for name, d := range gone {
		if exists(t, pool, "tokens", "token_digest = $1", d) {
			t.Errorf("row %q survived; every credential expired more than Retention ago", name)
		}
	}
	if st.Tokens != int64(len(gone)) {
		t.Errorf("Stats.Tokens = %d, want %d", st.Tokens, len(gone))
	}
}

func TestPassHonoursRotationAndRevocationRetention(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	type fixture struct {
		name  string
		age   time.Duration
		alive bool
	}
	// Default Retention 24h for rotations (after the refresh token's expiry),
	// default RevocationRetention 744h for revocations (after revoked_at).
	rotations := []fixture{{"future", -time.Hour, true}, {"recent", 23 * time.Hour, true}, {"old", 25 * time.Hour, false}, {"ancient", 2000 * time.Hour, false}}
	revocations := []fixture{{"new", time.Minute, true}, {"within", 743 * time.Hour, true}, {"past", 745 * time.Hour, false}, {"ancient", 5000 * time.Hour, false}}
	keys := map[string][]byte{}
	for _, f := range rotations {
		keys["rot "+f.name] = random(32)
		_, err := pool.Exec(ctx, `INSERT INTO refresh_rotations (refresh_digest, rotated_at, expires_at)
			VALUES ($1, now() - $2::interval - interval '1 day', now() - $2::interval)`, keys["rot "+f.name], f.age)
		testenv.Must(t, err, "insert rotation")
		keys["exch "+f.name] = random(32)
		_, err = pool.Exec(ctx, `INSERT INTO token_exchanges (subject_digest, exchanged_at, valid_until, expires_at)
			VALUES ($1, now() - $2::interval - interval '1 hour', now() - $2::interval - interval '1 hour', now() - $2::interval)`, keys["exch "+f.name], f.age)
		testenv.Must(t, err, "insert exchange")
	}
	for _, f := range revocations {
		keys["fam "+f.name] = random(16)
		_, err := pool.Exec(ctx, `INSERT INTO revoked_families (family_id, reason, revoked_at)
			VALUES ($1, 'client_request', now() - $2::interval)`, keys["fam "+f.name], f.age)
		testenv.Must(t, err, "insert family")
		_, err = pool.Exec(ctx, `INSERT INTO revoked_grants (client_id, subject, up_to_seq, revoked_at)
			VALUES ('client', $1, 42, now() - $2::interval)`, f.name, f.age)
		testenv.Must(t, err, "insert grant")
	}
	st, err := cleanup.Pass(ctx, pool, cleanup.Config{BatchSize: 1, Pause: -1}, nil)
	testenv.Must(t, err, "pass")
	if st.Rotations != 2 || st.Exchanges != 2 || st.RevokedFamilies != 2 || st.RevokedGrants != 2 || st.Tokens != 0 {
		t.Fatalf("deleted %+v, want 2 rotations, 2 exchanges, 2 families, 2 grants, no tokens", st)
	}
	for _, f := range rotations {
		if got := exists(t, pool, "refresh_rotations", "refresh_digest = $1", keys["rot "+f.name]); got != f.alive {
			t.Errorf("rotation whose refresh token expired %s ago: exists = %v, want %v", f.age, got, f.alive)
		}
		if got := exists(t, pool, "token_exchanges", "subject_digest = $1", keys["exch "+f.name]); got != f.alive {
			t.Errorf("exchange whose token expired %s ago: exists = %v, want %v", f.age, got, f.alive)
		}
	}
	for _, f := range revocations {
		if got := exists(t, pool, "revoked_families", "family_id = $1", keys["fam "+f.name]); got != f.alive {
			t.Errorf("family revoked %s ago: exists = %v, want %v", f.age, got, f.alive)
		}
		if got := exists(t, pool, "revoked_grants", "subject = $1", f.name); got != f.alive {
			t.Errorf("grant revoked %s ago: exists = %v, want %v", f.age, got, f.alive)
		}
	}

	// Shorter retentions, as configured.
	st, err = cleanup.Pass(ctx, pool, cleanup.Config{Retention: time.Minute, RevocationRetention: time.Hour, Pause: -1}, nil)
	testenv.Must(t, err, "pass with short retention")
	if st.Rotations != 1 || st.Exchanges != 1 || st.RevokedFamilies != 1 || st.RevokedGrants != 1 {
		t.Fatalf("short retention deleted %+v, want 1 rotation, 1 exchange, 1 family, 1 grant", st)
	}
	if count(t, pool, "refresh_rotations") != 1 || count(t, pool, "revoked_families") != 1 || count(t, pool, "revoked_grants") != 1 {
		t.Fatal("want the future rotation and the newest revocations left")
	}
}

func TestPassIsIdempotent(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	insert(t, pool,
		row{name: "a", state: "INACTIVE", expires: ago(48 * time.Hour)},
		row{name: "b", state: "REVOKED", expires: ago(48 * time.Hour), refresh: ref(ago(30 * time.Hour)), family: true},
		row{name: "c", state: "ACTIVE", expires: in(time.Hour)},
		row{name: "d", state: "REVOKED", expires: ago(48 * time.Hour), refresh: ref(in(time.Hour)), family: true},
	)
	_, err := pool.Exec(ctx, `INSERT INTO refresh_rotations VALUES ($1, now() - interval '50 hours', now() - interval '49 hours')`, random(32))
	testenv.Must(t, err, "insert rotation")
	cfg := cleanup.Config{BatchSize: 1, Pause: -1}
	first, err := cleanup.Pass(ctx, pool, cfg, nil)
	testenv.Must(t, err, "first pass")
	if first.Tokens != 2 || first.Rotations != 1 {
		t.Fatalf("first pass deleted %+v, want 2 tokens and 1 rotation", first)
	}
	second, err := cleanup.Pass(ctx, pool, cfg, nil)
	testenv.Must(t, err, "second pass")
	if second.Total() != 0 {
		t.Fatalf("second pass deleted %+v, want nothing", second)
	}
	if n := count(t, pool, "tokens"); n != 2 {
		t.Fatalf("%d token rows left after two passes, want 2", n)
	}
}

// A row another transaction holds (a persister batch, recovery) is skipped,
// not waited for, and goes in a later pass.
func TestPassSkipsLockedRows(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	ctx := context.Background()
	d := insert(t, pool,
		row{name: "locked", state: "ACTIVE", expires: ago(48 * time.Hour)},
		row{name: "free", state: "INACTIVE", expires: ago(48 * time.Hour)},
	)
	tx, err := pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	_, err = tx.Exec(ctx, `UPDATE tokens SET state = 'INACTIVE' WHERE token_digest = $1`, d["locked"])
	testenv.Must(t, err, "lock row")

	passCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	st, err := cleanup.Pass(passCtx, pool, noPause(cleanup.DefaultConfig()), nil)
	cancel()
	testenv.Must(t, err, "pass beside a held row")
	if st.Tokens != 1 || exists(t, pool, "tokens", "token_digest = $1", d["free"]) {
		t.Fatalf("pass deleted %d rows, want only the free one", st.Tokens)
	}
	testenv.Must(t, tx.Commit(ctx), "commit")
	st, err = cleanup.Pass(ctx, pool, noPause(cleanup.DefaultConfig()), nil)
	testenv.Must(t, err, "pass after release")
	if st.Tokens != 1 || count(t, pool, "tokens") != 0 {
		t.Fatalf("pass after release deleted %d rows, want the formerly held one", st.Tokens)
	}
}

func TestRunCountsDeletionsUntilCancelled(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	insert(t, pool,
		row{name: "a", state: "INACTIVE", expires: ago(48 * time.Hour)},
		row{name: "b", state: "EXPIRED", expires: ago(48 * time.Hour)},
		row{name: "c", state: "ACTIVE", expires: in(time.Hour)},
	)
	reg := prometheus.NewRegistry()
	m := cleanup.NewMetrics(reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		cleanup.Run(ctx, pool, cleanup.Config{Pause: -1}, 20*time.Millisecond, testenv.Logger(t), m)
	}()
	testenv.Eventually(t, 10*time.Second, "two passes", func() (bool, error) {
		return passes(t, reg) >= 2, nil
	})
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	if got := deleted(t, reg, cleanup.TableTokens); got != 2 {
		t.Fatalf("tokenpipe_cleanup_rows_deleted_total{table=tokens} = %v, want 2", got)
	}
	if n := count(t, pool, "tokens"); n != 1 {
		t.Fatalf("%d rows left, want the live one", n)
	}
}

// passes reads the sample count of tokenpipe_cleanup_pass_seconds.
func passes(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() == "tokenpipe_cleanup_pass_seconds" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	return 0
}

// deleted reads tokenpipe_cleanup_rows_deleted_total{table}.
func deleted(t *testing.T, reg *prometheus.Registry, table string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	testenv.Must(t, err, "gather")
	for _, mf := range mfs {
		if mf.GetName() != "tokenpipe_cleanup_rows_deleted_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "table" && l.GetValue() == table {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no tokenpipe_cleanup_rows_deleted_total{table=%q}", table)
	return 0
}
