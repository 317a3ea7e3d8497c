package e2e

import (
	"strconv"
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

// TestRecoveryKilledMidTransactionLosesNothing fills the stream with many
// racing tokens per key, kills recovery processes with SIGKILL while they
// resolve, and audits: one row per token, the newest of each key ACTIVE.
func TestRecoveryKilledMidTransactionLosesNothing(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 3*time.Minute)
	// 400 keys, 15 tokens each, interleaved: most events conflict.
	var evs []*events.TokenIssued
	for round := 0; round < 15; round++ {
		for k := 0; k < 400; k++ {
			evs = append(evs, testenv.Token("app", "user-"+itoa(k), "read"))
		}
	}
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_ACK_WAIT=3s", "TOKENPIPE_BATCH_SIZE=100", "TOKENPIPE_WORKERS=1")
	d.start("persister", "persister")
	testenv.Must(t, bench.Fill(ctx, js, topo, evs, nil), "fill")

	resolved := func() int {
		var n int
		testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM tokens WHERE state = 'INACTIVE'").Scan(&n), "count")
		return n
	}
	for round := 0; round < 3; round++ {
		r := d.start("recovery", "recovery")
		before := resolved()
		testenv.Eventually(t, 60*time.Second, "recovery progress", func() (bool, error) {
			return resolved() >= before+200, nil
		})
		r.kill(t)
	}
	d.start("recovery-last", "recovery")
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	testenv.Eventually(t, 90*time.Second, "clean audit", func() (bool, error) {
		report, err := audit.Check(ctx, pool, digests, stream, topo.Persister, topo.Recovery)
		return err == nil && report.Clean(), err
	})
	var active int
	testenv.Must(t, pool.QueryRow(ctx, "SELECT count(*) FROM tokens WHERE state = 'ACTIVE'").Scan(&active), "count")
	if active != 400 {
		t.Fatalf("ACTIVE rows = %d, want one per key (400)", active)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestIssuerKilledMidRequestLosesNothing kills one of two issuers with
// SIGKILL under steady load. Requests in flight on it fail (no token was
// handed out, so none needs a row); every token that did get a 200, on
// either issuer, has exactly one row.
func TestIssuerKilledMidRequestLosesNothing(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	scopes := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	addClient(t, pool, "kill-app", "kill-secret", scopes...)
	d := newDeployment(t, dbURL, topo)
	victim, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	load := startLoad(t, 400, "kill-app", "kill-secret", scopes, url1, url2)
	time.Sleep(1500 * time.Millisecond)
	victim.kill(t)
	time.Sleep(500 * time.Millisecond)
	load.setTargets(url2)
	time.Sleep(1500 * time.Millisecond)
	digests, errs := load.finish()
	t.Logf("%d tokens issued; failed: %v", len(digests), errs)
	if len(digests) < 300 {
		t.Fatalf("only %d tokens issued", len(digests))
	}
	stream, err := js.Stream(ctxT(t, 5*time.Second), topo.Stream)
	testenv.Must(t, err, "stream")
	testenv.Eventually(t, 60*time.Second, "clean audit", func() (bool, error) {
		r, err := audit.Check(ctxT(t, 20*time.Second), pool, digests, stream, topo.Persister, topo.Recovery)
		return err == nil && r.Clean(), err
	})
}
