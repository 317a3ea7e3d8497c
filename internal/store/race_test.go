package store_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// A concurrent writer that stores a token or a key between a batch's probe
// and its COPY makes the COPY fail on a unique index. The batch must still
// decide every row as if it had seen that write: the same token is reported
// existing (one row, not two), an older token of a key that now has a newer
// ACTIVE one is stored INACTIVE, and the batch's other rows are ACTIVE.
//
// Not parallel: the hook is the package's.
func TestBatchLosingARaceAfterItsProbe(t *testing.T) {
	_, pool := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := testenv.Name("race_")
	same := testenv.Token(client, "u1", "read")
	older := testenv.Token(client, "u2", "read")
	newer := testenv.Token(client, "u2", "read")
	other := testenv.Token(client, "u3", "read")
	rows := []store.Row{{Event: same, Seq: 10}, {Event: older, Seq: 11}, {Event: other, Seq: 12}}

	var fired atomic.Bool
	raced := false
	store.AfterProbe(t, func() {
		if fired.Swap(true) {
			return // the concurrent batch's own probe, and any retry
		}
		// Another persister, on its own connection, commits first.
		out, err := store.WriteBatch(ctx, pool, []store.Row{{Event: same, Seq: 10}, {Event: newer, Seq: 20}})
		testenv.Must(t, err, "concurrent batch")
		raced = out[0] == store.Inserted && out[1] == store.Inserted
	})
	out, err := store.WriteBatch(ctx, pool, rows)
	testenv.Must(t, err, "batch that lost the race")
	if !raced {
		t.Fatal("the concurrent batch did not run between the probe and the COPY")
	}
	if want := []store.Outcome{store.Existing, store.Inserted, store.Inserted}; !equalOutcomes(out, want) {
		t.Fatalf("outcomes %v, want %v", out, want)
	}
	want := map[events.Digest]string{same.TokenDigest: "ACTIVE", older.TokenDigest: "INACTIVE", newer.TokenDigest: "ACTIVE", other.TokenDigest: "ACTIVE"}
	for d, w := range want {
		var state string
		var n int
		testenv.Must(t, pool.QueryRow(ctx, `SELECT min(state), count(*) FROM tokens WHERE token_digest = $1`, d[:]).Scan(&state, &n), "read row")
		if n != 1 || state != w {
			t.Errorf("token %x: %d rows, state %q; want one row %s", d[:4], n, state, w)
		}
	}
}

func equalOutcomes(a, b []store.Outcome) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Two persister workers whose batches share keys, each batch with rows for
// both of its paths, must not deadlock. Worker A's batch has a fresh token
// of key k5 and two of key k1; worker B's has a fresh token of k1 and two of
// k5. Written as a COPY of the fresh rows and then an INSERT of the others,
// A held k5 and waited for k1 while B held k1 and waited for k5: Postgres
// broke the cycle after deadlock_timeout (a second by default), and one
// batch was retried, a second late for every token in it. Seen in the
// conflict mix at 1,000 tokens/s, when re-issues meet the tokens of
// simultaneous identical requests still in flight.
//
// Not parallel: the hook is the package's.
func TestBatchesSharingKeysDoNotDeadlock(t *testing.T) {
	_, pool := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := testenv.Name("deadlock_")
	tok := func(subject string) *events.TokenIssued { return testenv.Token(client, subject, "read") }
	a := []store.Row{{Event: tok("k5"), Seq: 1}, {Event: tok("k1"), Seq: 2}, {Event: tok("k1"), Seq: 3}}
	b := []store.Row{{Event: tok("k1"), Seq: 4}, {Event: tok("k5"), Seq: 5}, {Event: tok("k5"), Seq: 6}}

	var started atomic.Bool
	type result struct {
		out []store.Outcome
		err error
	}
	resB := make(chan result, 1)
	store.AfterFirstWrite(t, func() {
		if started.Swap(true) {
			return // B's own first write
		}
		// A holds what it wrote first; B runs its whole batch meanwhile.
		go func() {
			out, err := store.WriteBatch(ctx, pool, b)
			resB <- result{out, err}
		}()
		// Let B take what it writes first and wait for A.
		time.Sleep(300 * time.Millisecond)
	})
	outA, errA := store.WriteBatch(ctx, pool, a)
	if !started.Load() {
		t.Fatal("batch A wrote nothing before committing")
	}
	testenv.Must(t, errA, "batch A")
	rb := <-resB
	testenv.Must(t, rb.err, "batch B")
	inserted := 0
	for _, o := range append(outA, rb.out...) {
		if o == store.Inserted {
			inserted++
		}
	}
	var rows int
	testenv.Must(t, pool.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE client_id = $1`, client).Scan(&rows), "count rows")
	if rows != inserted {
		t.Errorf("%d rows stored, %d reported inserted", rows, inserted)
	}
}
