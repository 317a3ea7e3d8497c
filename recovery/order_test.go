package recovery_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/persister"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// delivery is one message arriving at the persister: an event and the stream
// sequence JetStream gave it. A redelivery repeats a delivery.
type delivery struct {
	ev  *events.TokenIssued
	seq uint64
}

// TestFinalStateIsOrderIndependent applies every permutation of a set of
// deliveries (tokens over several keys, plus redeliveries) through the real
// persister and recovery SQL, and checks that each ends in the same table:
// per key the highest sequence ACTIVE, every other token INACTIVE, one row per
// token. Each permutation runs in a transaction that is rolled back.
func TestFinalStateIsOrderIndependent(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	k1a := testenv.Token("app", "u1", "read")
	k1b := testenv.Token("app", "u1", "read")
	k1c := testenv.Token("app", "u1", "read")
	k2a := testenv.Token("app", "u2", "read", "write")
	k2b := testenv.Token("app", "u2", "read", "write")
	// Sequences as JetStream would assign them; the last two deliveries are
	// redeliveries of earlier messages.
	set := []delivery{{k1a, 1}, {k2a, 2}, {k1b, 3}, {k2b, 4}, {k1c, 5}, {k1b, 3}, {k2a, 2}}
	want := map[events.Digest]string{
		k1a.TokenDigest: "INACTIVE", k1b.TokenDigest: "INACTIVE", k1c.TokenDigest: "ACTIVE",
		k2a.TokenDigest: "INACTIVE", k2b.TokenDigest: "ACTIVE",
	}
	if testing.Short() {
		set = set[:5] // 120 permutations instead of 5040
	}

	start := time.Now()
	perms := 0
	for _, deferRecovery := range []bool{false, true} {
		seen := map[string]bool{}
		permute(set, func(order []delivery) {
			// A redelivery is indistinguishable from its original, so
			// orderings that differ only by swapping the two are one case.
			key := describe(order)
			if seen[key] {
				return
			}
			seen[key] = true
			perms++
			got := applyInTx(t, pool, order, deferRecovery)
			for d, s := range want {
				if got[d] != s {
					t.Fatalf("order %s (recovery deferred: %v): token %s is %q, want %q", describe(order), deferRecovery, d.String()[:8], got[d], s)
				}
			}
			if len(got) != len(want) {
				t.Fatalf("order %s: %d rows, want %d", describe(order), len(got), len(want))
			}
		})
	}
	t.Logf("%d distinct orderings of %d deliveries converged in %s", perms, len(set), time.Since(start).Round(time.Millisecond))
}

// applyInTx feeds deliveries one at a time to the persister's batch write;
// conflicts go to recovery at once or, if deferRecovery, all at the end.
func applyInTx(t *testing.T, pool interface {
	Begin(context.Context) (pgx.Tx, error)
}, order []delivery, deferRecovery bool) map[events.Digest]string {
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer tx.Rollback(ctx)
	noNotice := func([]recovery.Superseded) error { return nil }
	var queued []recovery.Incoming
	for _, d := range order {
		out, err := persister.WriteBatch(ctx, tx, []persister.Row{{Event: d.ev, Seq: d.seq}})
		testenv.Must(t, err, "write batch")
		if out[0] != persister.Conflict {
			continue
		}
		in := recovery.Incoming{Event: d.ev, Seq: d.seq}
		if deferRecovery {
			queued = append(queued, in)
			continue
		}
		_, err = recovery.Apply(ctx, tx, []recovery.Incoming{in}, noNotice)
		testenv.Must(t, err, "recovery")
	}
	if len(queued) > 0 {
		_, err := recovery.Apply(ctx, tx, queued, noNotice)
		testenv.Must(t, err, "deferred recovery")
	}
	rows, err := tx.Query(ctx, "SELECT token_digest, state FROM tokens")
	testenv.Must(t, err, "read table")
	got := map[events.Digest]string{}
	for rows.Next() {
		var d []byte
		var s string
		testenv.Must(t, rows.Scan(&d, &s), "scan")
		got[events.Digest(d)] = s
	}
	testenv.Must(t, rows.Err(), "rows")
	return got
}

// permute calls f with every ordering of items (Heap's algorithm).
func permute(items []delivery, f func([]delivery)) {
	a := append([]delivery(nil), items...)
	var gen func(k int)
	gen = func(k int) {
		if k == 1 {
			f(a)
			return
		}
		for i := 0; i < k; i++ {
			gen(k - 1)
			if k%2 == 0 {
				a[i], a[k-1] = a[k-1], a[i]
			} else {
				a[0], a[k-1] = a[k-1], a[0]
			}
		}
	}
	gen(len(a))
}

func describe(order []delivery) string {
	s := ""
	for _, d := range order {
		s += fmt.Sprintf("%d ", d.seq)
	}
	return s
}
