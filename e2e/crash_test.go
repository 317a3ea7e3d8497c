package e2e

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPersisterKilledMidBatchLosesNothing kills persister processes with
// SIGKILL while they drain a full stream, starts others, and audits: every
// event has exactly one row and nothing is left pending.
func TestPersisterKilledMidBatchLosesNothing(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 3*hangGuard)
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
		testenv.Eventually(t, hangGuard, "progress before the kill", func() (bool, error) {
			return count() >= before+3000, nil
		})
		p.kill(t)
	}
	faultEnd := time.Now()
	d.start("persister-last", "persister")
	d.start("recovery", "recovery")
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	auditUntilClean(t, "persister SIGKILL mid-batch x3 (stream of 30k events)", len(evs), digests, pool, js, topo, faultEnd)
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
	ctx := ctxT(t, 3*hangGuard)
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
		testenv.Eventually(t, hangGuard, "recovery progress", func() (bool, error) {
			return resolved() >= before+200, nil
		})
		r.kill(t)
	}
	faultEnd := time.Now()
	d.start("recovery-last", "recovery")
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	auditUntilClean(t, "recovery SIGKILL mid-transaction x3 (6k racing tokens, 400 keys)", len(evs), digests, pool, js, topo, faultEnd)
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
	load.waitMore(t, "before the kill", 150)
	victim.kill(t)
	// Requests keep going to the dead issuer for a moment, as they would
	// until a load balancer's health check notices.
	time.Sleep(500 * time.Millisecond)
	load.setTargets(url2)
	load.waitMore(t, "after the kill", 150)
	digests, errs := load.finish()
	t.Logf("%d tokens issued; failed: %v", len(digests), errs)
	auditUntilClean(t, "issuer SIGKILL mid-request (1 of 2, 400 req/s)", int(load.sent.Load()), digests, pool, js, topo, time.Now())
}

// TestConnectionsCutMidTransaction terminates the persister's and recovery's
// Postgres connections over and over while they drain a conflict-heavy
// stream, so COPYs and transactions are cut in the middle. Each cut batch
// is retried on a new connection; the audit must be clean.
func TestConnectionsCutMidTransaction(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	ctx := ctxT(t, 3*hangGuard)
	var evs []*events.TokenIssued
	for round := 0; round < 4; round++ {
		evs = append(evs, bench.MakeEvents(10000)...)
		for k := 0; k < 500; k++ {
			evs = append(evs, testenv.Token("app", "racer-"+itoa(k), "read"))
		}
	}
	testenv.Must(t, bench.Fill(ctx, js, topo, evs, nil), "fill")
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_BATCH_SIZE=1000", "TOKENPIPE_LOG_LEVEL=warn")
	per := d.start("persister", "persister")
	d.start("recovery", "recovery")
	var dbName string
	testenv.Must(t, pool.QueryRow(ctx, "SELECT current_database()").Scan(&dbName), "db name")
	cuts := 0
	for i := 0; i < 40; i++ {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE datname = $1 AND pid <> pg_backend_pid() AND state <> 'idle') x`, dbName).Scan(&n)
		testenv.Must(t, err, "terminate")
		cuts += n
		time.Sleep(50 * time.Millisecond)
	}
	faultEnd := time.Now()
	t.Logf("cut %d busy connections", cuts)
	if cuts == 0 {
		t.Fatal("no busy connection was cut; the test proved nothing")
	}
	digests := make([]events.Digest, len(evs))
	for i, e := range evs {
		digests[i] = e.TokenDigest
	}
	auditUntilClean(t, "Postgres connections cut mid-COPY/mid-transaction x40 (42k events, 2k racing)", len(evs), digests, pool, js, topo, faultEnd)
	if !strings.Contains(per.output(), "retrying") {
		t.Fatalf("persister never retried a cut batch:\n%s", per.output())
	}
}
