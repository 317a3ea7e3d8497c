package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestScaleRolesUnderLoad runs the roles as separate processes under steady
// load, scales persisters 1 -> 4 -> 2 (the last two stopped with SIGTERM),
// replaces an issuer (SIGTERM, then a new one), and audits at the end: every
// token that got a 200 has exactly one row, one ACTIVE row per key at most,
// and nothing is left pending.
func TestScaleRolesUnderLoad(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	var scopes []string
	for i := range 40 {
		scopes = append(scopes, fmt.Sprintf("s%02d", i))
	}
	addClient(t, pool, "scale-app", "scale-secret", scopes...)
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_BATCH_WAIT=20ms")
	issuer1, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("recovery", "recovery")
	persisters := []*proc{d.start("persister-1", "persister")}

	// 40 keys at 300 requests/s: every key is re-issued often, so recovery
	// works all along.
	load := startLoad(t, 300, "scale-app", "scale-secret", scopes, url1, url2)
	phase := func(what string) {
		load.waitMore(t, what, 250)
		t.Logf("%s; %d requests sent so far", what, load.sent.Load())
	}
	phase("1 persister")
	for i := 2; i <= 4; i++ {
		persisters = append(persisters, d.start(fmt.Sprintf("persister-%d", i), "persister"))
	}
	phase("4 persisters")
	for _, p := range persisters[2:] {
		p.terminate(t, 15*time.Second)
	}
	phase("2 persisters")
	// Replace an issuer: take it out of rotation as a load balancer would on
	// readiness, then SIGTERM it while requests may still be in flight.
	load.setTargets(url2)
	issuer1.terminate(t, 15*time.Second)
	_, url3 := d.issuer("issuer-3")
	load.setTargets(url2, url3)
	phase("issuer-1 replaced by issuer-3")

	digests, errs := load.finish()
	t.Logf("%d tokens issued; refused or failed: %v", len(digests), errs)
	auditUntilClean(t, "persisters 1->4->2 (SIGTERM), issuer replaced, 300 req/s", int(load.sent.Load()), digests, pool, js, topo, time.Now())
}
