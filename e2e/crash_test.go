package e2e

import (
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/audit"
	"github.com/tokenpipe/tokenpipe/bench"
	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPersisterKilledMidBatchLosesNothing kills persister processes with
// SIGKILL while they drain a full stream, starts others, and audits: every
// event has exactly one row and nothing is left pending.
func TestPersisterKilledMidBatchLosesNothing(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 3*time.Minute)
	evs := bench.MakeEvents(30000)
	testenv.Must(t, bench.Fill(ctx, js, topo, evs, nil), "fill")
	// A short ack wait so the killed process's batch comes back quickly.
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_ACK_WAIT=3s", "TOKENPIPE_BATCH_SIZE=500", "TOKENPIPE_WORKERS=2")

	count := func() int {
		var n int
		testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM tokens").Scan(&n), "count")
		return n
	}
	for round := 0; round < 3; round++ {
		p := d.start("persister", "persister")
		before := count()
		testenv.Eventually(t, 60*time.Second, "progress before the kill", func() (bool, error) {
			return count() >= before+3000, nil
		})
		p.kill(t)
	}
	d.start("persister-last", "persister")
	d.start("recovery", "recovery")
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	var report *audit.Report
	testenv.Eventually(t, 90*time.Second, "clean audit", func() (bool, error) {
		report, err = audit.Check(ctx, pool, digests, stream, topo.Persister, topo.Recovery)
		return err == nil && report.Clean(), err
	})
	if n := count(); n != len(evs) {
		t.Fatalf("rows = %d, want %d", n, len(evs))
	}
}
