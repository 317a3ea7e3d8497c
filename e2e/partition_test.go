package e2e

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPartitionedPersistersUnderLoad runs the roles as separate processes
// with TOKENPIPE_PARTITIONS=4 and two persisters owning two partitions each;
// one of them is killed with SIGKILL under load and started again. Its
// partitions wait for it (no other persister reads them) and drain after the
// restart; the audit ends clean.
func TestPartitionedPersistersUnderLoad(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	topo.Partitions = 4
	var scopes []string
	for i := range 40 {
		scopes = append(scopes, fmt.Sprintf("s%02d", i))
	}
	addClient(t, pool, "part-app", "part-secret", scopes...)
	d := newDeployment(t, dbURL, topo, "TOKENPIPE_BATCH_WAIT=20ms", "TOKENPIPE_PARTITIONS=4")
	_, url1 := d.issuer("issuer-1")
	_, url2 := d.issuer("issuer-2")
	d.start("recovery", "recovery")
	low := d.start("persister-0-1", "persister", "TOKENPIPE_PARTITION_SET=0-1")
	high := d.start("persister-2-3", "persister", "TOKENPIPE_PARTITION_SET=2,3")

	// 40 keys at 300 requests/s: every key is re-issued often.
	load := startLoad(t, 300, "part-app", "part-secret", scopes, url1, url2)
	time.Sleep(1500 * time.Millisecond)
	high.kill(t)
	// Nobody else reads partitions 2 and 3: their backlog grows until the
	// persister is back.
	testenv.Eventually(t, 30*time.Second, "a backlog on partitions 2 and 3 while their persister is down", func() (bool, error) {
		n, err := pendingOf(t, js, topo.Stream, topo.PartitionConsumer(2), topo.PartitionConsumer(3))
		return n > 0, err
	})
	restarted := d.start("persister-2-3-again", "persister", "TOKENPIPE_PARTITION_SET=2-3")
	time.Sleep(1500 * time.Millisecond)

	digests, errs := load.finish()
	t.Logf("%d tokens issued; refused or failed: %v", len(digests), errs)
	if len(digests) < 100 {
		t.Fatalf("only %d tokens issued under load", len(digests))
	}
	auditUntilClean(t, "4 partitions, 2 persisters, one SIGKILLed and restarted, 300 req/s", int(load.sent.Load()), digests, pool, js, topo, time.Now())

	// Each persister exports the lag of exactly the consumers it reads.
	for p, want := range map[*proc][]string{low: {topo.PartitionConsumer(0), topo.PartitionConsumer(1), topo.Persister}, restarted: {topo.PartitionConsumer(2), topo.PartitionConsumer(3)}} {
		metrics := scrape(t, p)
		for _, c := range want {
			if !strings.Contains(metrics, `tokenpipe_consumer_pending_messages{consumer="`+c+`"}`) {
				t.Errorf("%s exports no lag for %s", p.name, c)
			}
		}
		if strings.Count(metrics, "tokenpipe_consumer_pending_messages{") != len(want) {
			t.Errorf("%s exports lag for other consumers than %v", p.name, want)
		}
	}
}

func scrape(t *testing.T, p *proc) string {
	t.Helper()
	resp, err := http.Get("http://" + p.opsAddr + "/metrics")
	testenv.Must(t, err, "scrape "+p.name)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	testenv.Must(t, err, "read metrics of "+p.name)
	return string(body)
}

// pendingOf sums what the named consumers have not yet had acknowledged.
func pendingOf(t *testing.T, js jetstream.JetStream, stream string, consumers ...string) (uint64, error) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	var sum uint64
	for _, name := range consumers {
		c, err := js.Consumer(ctx, stream, name)
		if err != nil {
			return 0, err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return 0, err
		}
		sum += info.NumPending + uint64(info.NumAckPending)
	}
	return sum, nil
}
