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
