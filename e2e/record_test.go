package e2e

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// auditUntilClean polls the auditor until it is clean (or fails the test)
// and logs one RELIABILITY line with the case's figures, which `make chaos`
// collects into RELIABILITY.md: load offered, tokens issued, lost,
// duplicated, keys with two ACTIVE rows, and the time from the end of the
// fault (since) until the audit was clean with nothing pending. It returns
// the clean report.
func auditUntilClean(t *testing.T, name string, offered int, digests []events.Digest, pool *pgxpool.Pool, js jetstream.JetStream, topo events.Topology, since time.Time) *audit.Report {
	t.Helper()
	ctx := ctxT(t, hangGuard+time.Minute)
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	var r *audit.Report
	testenv.Eventually(t, hangGuard, name+": clean audit", func() (bool, error) {
		r, err = audit.Check(ctx, pool, digests, stream, append(topo.PersisterConsumers(), topo.Recovery)...)
		return err == nil && r.Clean(), err
	})
	t.Logf("RELIABILITY|%s|%d|%d|%d|%d|%d|%s", name, offered, len(digests), len(r.Missing), len(r.Duplicated), len(r.DoubleActive),
		time.Since(since).Round(10*time.Millisecond))
	return r
}
