package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/schema"
	"github.com/tokenpipe/tokenpipe/internal/status"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPostgresPrimaryKilledAsyncReplicationReplayRestores is the hole
// asynchronous replication leaves: the persister acks an event once its row
// commits on the primary, and a primary that dies before its standby got
// that commit takes the row with it while the stream has forgotten the
// event was ever unprocessed. The test shows the rows missing after the
// promotion, then restores them with `tokenpipe replay --since <safe point>`
// and audits clean, with a grant revoked on the new primary before the
// replay: replayed tokens it covers must come back REVOKED, and older
// tokens of a key must not displace newer ones.
func TestPostgresPrimaryKilledAsyncReplicationReplayRestores(t *testing.T) {
	testPrimaryKilled(t, false)
}

// TestPostgresPrimaryKilledSyncReplicationLosesNothing is the same failover
// with synchronous replication: a commit returns only once the standby has
// it, so the persister never acks a row the standby lacks and nothing is
// missing after the promotion, before any replay.
func TestPostgresPrimaryKilledSyncReplicationLosesNothing(t *testing.T) {
	testPrimaryKilled(t, true)
}

// lagWatch samples the durable consumers' lag in time (the age of the
// oldest message not yet acknowledged, as `tokenpipe status` shows it)
// and keeps the largest seen per consumer, and the longest time between
// two samples: the lag can have grown by that much unseen.
type lagWatch struct {
	mu     sync.Mutex
	max    map[string]time.Duration
	last   time.Time
	maxGap time.Duration
	stop   context.CancelFunc
	done   chan struct{}
}

func watchLag(t *testing.T, js jetstream.JetStream, topo events.Topology) *lagWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &lagWatch{max: map[string]time.Duration{}, last: time.Now(), stop: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			if r, err := status.Gather(ctx, js, nil, topo); err == nil {
				w.record(r)
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(w.finish)
	return w
}

func (w *lagWatch) record(r *status.Report) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.maxGap = max(w.maxGap, r.Time.Sub(w.last))
	w.last = r.Time
	for _, c := range r.Consumers {
		if c.OldestUnackedSeconds != nil {
			w.max[c.Name] = max(w.max[c.Name], time.Duration(*c.OldestUnackedSeconds*float64(time.Second)))
		}
	}
}

// finish stops the sampling; the time since the last sample is a gap too.
func (w *lagWatch) finish() {
	w.stop()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.last.IsZero() {
		w.maxGap = max(w.maxGap, time.Since(w.last))
		w.last = time.Time{}
	}
}

// gap is the longest time between two samples.
func (w *lagWatch) gap() time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.maxGap
}

// largest is the largest lag seen on the named consumer.
func (w *lagWatch) largest(name string) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.max[name]
}

func testPrimaryKilled(t *testing.T, syncRepl bool) {
	t.Parallel()
	ha := startHAPair(t, syncRepl, true, false)
	ctx := ctxT(t, 5*time.Minute)
	setup, err := pgxpool.New(ctx, ha.primary.url())
	testenv.Must(t, err, "primary pool")
	_, err = schema.Up(ctx, setup)
	testenv.Must(t, err, "migrate")
	scopes := []string{"a", "b", "c", "d", "e", "f"}
	addClient(t, setup, "ha-app", "ha-secret", scopes...)
	addClient(t, setup, "rev-app", "rev-secret", "a", "b")
	setup.Close()
	newPrimary, err := pgxpool.New(ctx, ha.standby.url())
	testenv.Must(t, err, "standby pool")
	defer newPrimary.Close()

	_, js, topo := testenv.JetStream(t)
	d := newDeployment(t, ha.url, topo, "TOKENPIPE_RETRY_MAX_ELAPSED=5s", "TOKENPIPE_NAK_DELAY=1s",
		"TOKENPIPE_BATCH_SIZE=100", "TOKENPIPE_LOG_LEVEL=warn")
	iss, tokenURL := d.issuer("issuer")
	roles := []*proc{iss, d.start("persister", "persister"), d.start("recovery", "recovery")}
	lag := watchLag(t, js, topo)
	load := startLoad(t, 150, "ha-app", "ha-secret", scopes, tokenURL)
	revLoad := startLoad(t, 50, "rev-app", "rev-secret", []string{"a", "b"}, tokenURL)

	time.Sleep(3 * time.Second)
	// The standby stops receiving WAL; the primary goes on committing (async)
	// or waits for it (sync). Then the primary dies and the standby is
	// promoted, as an operator or CloudNativePG would.
	ha.link.hold()
	time.Sleep(2 * time.Second)
	ha.primary.crash()
	faultStart := time.Now()
	// Only rows committed before the crash can be lost: the lag that
	// matters is the lag until then.
	lag.finish()
	ha.standby.promote()
	// The load goes on while the roles find the new primary by themselves.
	time.Sleep(3 * time.Second)
	digests, errs := load.finish()
	revDigests, revErrs := revLoad.finish()
	offered := int(load.sent.Load() + revLoad.sent.Load())
	all := append(append([]events.Digest{}, digests...), revDigests...)
	t.Logf("%d requests offered, %d tokens issued; refused: %v %v; load stopped %s after the crash",
		offered, len(all), errs, revErrs, time.Since(faultStart).Round(time.Millisecond))
	for _, p := range roles {
		select {
		case err := <-p.done:
			t.Fatalf("%s exited during the failover (%v); the roles must reconnect on their own\n%s", p.name, err, p.output())
		default:
		}
	}

	missing := missingAfterDrain(t, ctx, newPrimary, all, js, topo)
	mode := "async"
	if syncRepl {
		mode = "sync"
	}
	t.Logf("%s replication: %d of %d tokens handed out have no row on the promoted standby", mode, len(missing), len(all))
	if syncRepl {
		if len(missing) != 0 {
			t.Fatalf("synchronous replication lost %d rows in the failover", len(missing))
		}
		auditUntilClean(t, "Postgres primary SIGKILL, standby promoted, sync replication, WAL held 2s: 0 rows missing after promotion (no replay)",
			offered, all, newPrimary, js, topo, faultStart)
		return
	}
	if len(missing) == 0 {
		t.Fatal("no row was lost with asynchronous replication and WAL held back; the test proved nothing")
	}
	restoreByReplay(t, ctx, d, newPrimary, js, topo, lag, missing, revDigests)
	auditUntilClean(t, fmt.Sprintf("Postgres primary SIGKILL, standby promoted, async replication, WAL held 2s: %d rows missing before `replay --since`, 0 after", len(missing)),
		offered, all, newPrimary, js, topo, faultStart)
}

// missingAfterDrain waits until neither durable consumer has anything
// pending (every event not acked before the crash was written to the new
// primary), then returns the tokens without a row: the rows the crash lost.
func missingAfterDrain(t *testing.T, ctx context.Context, db *pgxpool.Pool, digests []events.Digest, js jetstream.JetStream, topo events.Topology) []events.Digest {
	t.Helper()
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	var r *audit.Report
	testenv.Eventually(t, 2*time.Minute, "pipeline drained on the new primary", func() (bool, error) {
		r, err = audit.Check(ctx, db, digests, stream, topo.Persister, topo.Recovery)
		if err != nil {
			return false, err
		}
		for _, n := range r.Pending {
			if n > 0 {
				return false, nil
			}
		}
		return true, nil
	})
	// The consumers were at rest before these rows were read (a conflict
	// copy counts as pending on recovery before the persister acks its
	// event), so nothing missing now is still on its way.
	r, err = audit.Check(ctx, db, digests, stream, topo.Persister, topo.Recovery)
	testenv.Must(t, err, "audit")
	if len(r.Duplicated) > 0 || len(r.DoubleActive) > 0 {
		t.Fatalf("after the failover: %d duplicated, %d keys with 2 ACTIVE", len(r.Duplicated), len(r.DoubleActive))
	}
	return r.Missing
}

// restoreByReplay revokes rev-app's grant on the new primary, then replays
// from the safe point:
//
//	since = R - (largest persister lag + largest recovery lag) - 2 x sampling gap - 1s
//
// R is the commit time of the last transaction the standby replayed before
// its promotion (pg_last_xact_replay_timestamp(), which stays fixed after
// it): every row it lacks was committed after R. A row commits after its
// event was published by at most the time the event waited for the
// persister (and, for a conflict, for recovery): the consumers' oldest
// unacknowledged age, which can have grown unseen by up to the longest gap
// between two samples (once per consumer). So every lost row's event was
// published after the safe point; the second covers clock skew between
// NATS and Postgres and commit timestamps taken just before their WAL
// record.
func restoreByReplay(t *testing.T, ctx context.Context, d *deployment, db *pgxpool.Pool, js jetstream.JetStream, topo events.Topology,
	lag *lagWatch, missing, revDigests []events.Digest) {
	t.Helper()
	runTool(t, ctx, d, "tokens", "revoke", "-client", "rev-app")
	var replayed time.Time
	testenv.Must(t, db.QueryRow(ctx, `SELECT pg_last_xact_replay_timestamp()`).Scan(&replayed), "last replayed commit")
	window := lag.largest(topo.Persister) + lag.largest(topo.Recovery) + 2*lag.gap() + time.Second
	since := replayed.Add(-window)
	t.Logf("safe point: last replayed commit %s - (persister lag %s + recovery lag %s + 2 x sampling gap %s + 1s) = %s",
		replayed.Format(time.RFC3339Nano), lag.largest(topo.Persister), lag.largest(topo.Recovery), lag.gap(), since.Format(time.RFC3339Nano))

	out := runTool(t, ctx, d, "replay", "--since", since.Format(time.RFC3339Nano), "--json")
	var sum replay.Summary
	testenv.Must(t, json.Unmarshal([]byte(out), &sum), "replay summary")
	t.Logf("replay: %d events from seq %d, %d inserted, %d conflicts resolved, %d already present",
		sum.Processed, sum.FirstSeq, sum.Inserted, sum.Resolved, sum.Present)
	if int(sum.Inserted+sum.Resolved) < len(missing) {
		t.Fatalf("replay wrote %d rows for %d missing", sum.Inserted+sum.Resolved, len(missing))
	}

	// Nothing the revocation covered may be ACTIVE, replayed or not.
	var active int
	testenv.Must(t, db.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE client_id = 'rev-app' AND state = 'ACTIVE'`).Scan(&active), "revoked")
	if active != 0 {
		t.Fatalf("%d rev-app tokens ACTIVE after the grant was revoked and the stream replayed", active)
	}
	var lostRevoked [][]byte
	isRev := map[events.Digest]bool{}
	for _, dg := range revDigests {
		isRev[dg] = true
	}
	for _, dg := range missing {
		if isRev[dg] {
			lostRevoked = append(lostRevoked, dg[:])
		}
	}
	var revoked int
	testenv.Must(t, db.QueryRow(ctx, `SELECT count(*) FROM tokens WHERE token_digest = ANY($1) AND state = 'REVOKED'`, lostRevoked).Scan(&revoked), "lost revoked")
	if revoked != len(lostRevoked) {
		t.Fatalf("%d of the %d lost rev-app tokens came back REVOKED", revoked, len(lostRevoked))
	}
	t.Logf("%d of the lost rows were rev-app tokens, replayed after its grant was revoked: all REVOKED", len(lostRevoked))
}

// runTool runs a tokenpipe command with the deployment's environment and
// returns its standard output.
func runTool(t *testing.T, ctx context.Context, d *deployment, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append(append([]string{}, d.env...), "TOKENPIPE_OPS_ADDR=")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tokenpipe %v: %v\n%s\n%s", args, err, out, stderr.String())
	}
	return string(out)
}
