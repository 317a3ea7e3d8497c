package recovery_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// A persister that activates a token of a key while recovery resolves that
// key (the key had no ACTIVE row to lock) must not fail recovery's batch:
// the batch's other keys are written, the raced key is resolved again in the
// same transaction, and the newer token wins either way. Before, the insert
// failed on the one-ACTIVE index, the whole batch rolled back and waited for
// a retry, and under a stream of re-issues the grown batch met the next race
// (the conflict-heavy mix held about 1,000 tokens/s).
//
// Not parallel: the hook is the package's, and the other tests apply
// batches too.
func TestRecoveryResolvesAgainAKeyActivatedUnderIt(t *testing.T) {
	_, pool := testenv.Database(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, persistedNewer := range []bool{false, true} {
		client := testenv.Name("raced_")
		incoming := testenv.Token(client, "u1", "read")  // recovery's conflict event
		persisted := testenv.Token(client, "u1", "read") // the persister's token of the same key
		bystander := testenv.Token(client, "u2", "read") // another key of the same batch
		inSeq, pSeq := uint64(10), uint64(5)
		if persistedNewer {
			pSeq = 20
		}
		var fired atomic.Bool
		recovery.AfterLock(t, func() {
			if fired.Swap(true) {
				return
			}
			out, err := store.WriteBatch(ctx, pool, []store.Row{{Event: persisted, Seq: pSeq}})
			testenv.Must(t, err, "the persister's batch")
			if out[0] != store.Inserted {
				t.Errorf("the persister's token: outcome %v, want inserted", out[0])
			}
		})
		_, err := recovery.Apply(ctx, pool, []recovery.Incoming{{Event: incoming, Seq: inSeq}, {Event: bystander, Seq: 11}},
			func([]recovery.Superseded) error { return nil })
		testenv.Must(t, err, "recovery batch that met the race")
		if !fired.Load() {
			t.Fatal("the persister did not write between recovery's lock and its insert")
		}
		want := map[events.Digest]string{incoming.TokenDigest: "ACTIVE", persisted.TokenDigest: "INACTIVE", bystander.TokenDigest: "ACTIVE"}
		if persistedNewer {
			want[incoming.TokenDigest], want[persisted.TokenDigest] = "INACTIVE", "ACTIVE"
		}
		for d, w := range want {
			var state string
			err := pool.QueryRow(ctx, `SELECT state FROM tokens WHERE token_digest = $1`, d[:]).Scan(&state)
			if err == pgx.ErrNoRows {
				state = "no row"
			} else {
				testenv.Must(t, err, "read row")
			}
			if state != w {
				t.Errorf("persisted newer %v: token %x is %s, want %s", persistedNewer, d[:4], state, w)
			}
		}
	}
}
