package recovery_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
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
			got := applyInTx(t, pool, order, deferRecovery, nil)
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

// applyInTx records the exchanges of the given tokens (as the issuer does
// before it publishes their successors), then feeds deliveries one at a time
// to the persister's batch write; conflicts go to recovery at once or, if
// deferRecovery, all at the end. It returns every token's state as
// introspection reads it (store.EffectiveStates).
func applyInTx(t *testing.T, pool interface {
	Begin(context.Context) (pgx.Tx, error)
}, order []delivery, deferRecovery bool, exchanged []*events.TokenIssued) map[events.Digest]string {
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	testenv.Must(t, err, "begin")
	defer tx.Rollback(ctx)
	for _, ev := range exchanged {
		_, _, err := store.RecordExchange(ctx, tx, ev.TokenDigest, ev.ExpiresAt)
		testenv.Must(t, err, "record exchange")
		testenv.Must(t, store.MarkExchangeAnswered(ctx, tx, ev.TokenDigest, time.Hour), "answer exchange")
	}
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
	got, err := store.EffectiveStates(ctx, tx)
	testenv.Must(t, err, "read states")
	return got
}

// TestExchangeFinalStateIsOrderIndependent: the same over per-request
// rotation. On key 1, a was exchanged for b and b for c (one family); on
// key 2, x was exchanged (its successor still queued) when another device's
// sign-in z (another family) took the key; b and x are redelivered. In every
// order, recovery immediate or deferred, the newest token of each key is
// ACTIVE, a and b are ROTATED (valid inside their windows, their family
// holds the key), and x is INACTIVE: an exchange never outlives the key's
// loss to another authorization.
func TestExchangeFinalStateIsOrderIndependent(t *testing.T) {
	t.Parallel()
	_, pool := testenv.Database(t)
	chain := func(user string, n int) []*events.TokenIssued {
		var f tokens.Family
		_, _ = rand.Read(f[:])
		out := make([]*events.TokenIssued, n)
		for i := range out {
			out[i] = testenv.Token("app", user, "read")
			out[i].FamilyID = &f
		}
		return out
	}
	k1 := chain("u1", 3)
	x := chain("u2", 1)[0]
	z := chain("u2", 1)[0]
	a, b, c := k1[0], k1[1], k1[2]
	set := []delivery{{a, 1}, {x, 2}, {b, 3}, {c, 5}, {z, 6}, {b, 3}, {x, 2}}
	want := map[events.Digest]string{
		a.TokenDigest: "ROTATED", b.TokenDigest: "ROTATED", c.TokenDigest: "ACTIVE",
		x.TokenDigest: "INACTIVE", z.TokenDigest: "ACTIVE",
	}
	if testing.Short() {
		set = set[:4]
		want = map[events.Digest]string{a.TokenDigest: "ROTATED", b.TokenDigest: "ROTATED", c.TokenDigest: "ACTIVE",
			x.TokenDigest: "ROTATED"}
	}
	exchanged := []*events.TokenIssued{a, b, x}
	perms := 0
	for _, deferRecovery := range []bool{false, true} {
		seen := map[string]bool{}
		permute(set, func(order []delivery) {
			key := describe(order)
			if seen[key] {
				return
			}
			seen[key] = true
			perms++
			got := applyInTx(t, pool, order, deferRecovery, exchanged)
			if len(got) != len(want) {
				t.Fatalf("order %s: %d rows, want %d", describe(order), len(got), len(want))
			}
			for d, s := range want {
				if got[d] != s {
					t.Fatalf("order %s (recovery deferred: %v): token %s is %q, want %q", describe(order), deferRecovery, d.String()[:8], got[d], s)
				}
			}
		})
	}
	t.Logf("%d distinct orderings of %d deliveries with exchanges converged", perms, len(set))
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
