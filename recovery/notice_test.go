package recovery_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/recovery"
)

// TestDeactivationNoticeGivesUpOnUnansweredPublish publishes a notice that
// reaches a listener but is never acknowledged, as happens to a publish the
// stream's leader received just before it died. Recovery waits for the
// notices inside its transaction, holding the keys' row locks, and the
// persister's inserts on those keys queue behind them: the wait must end
// with an error (the transaction rolls back and is retried) instead of
// lasting as long as the caller's context.
func TestDeactivationNoticeGivesUpOnUnansweredPublish(t *testing.T) {
	t.Parallel()
	nc, err := nats.Connect(testenv.NATSURL())
	testenv.Must(t, err, "connect")
	defer nc.Close()
	js, err := jetstream.New(nc)
	testenv.Must(t, err, "jetstream")
	// No stream takes these subjects; a plain subscriber swallows the
	// publish, so the server reports no missing responder and no ack comes.
	topo := testenv.Topology()
	sub, err := nc.SubscribeSync(topo.DeactivatedSubject())
	testenv.Must(t, err, "subscribe")
	defer sub.Unsubscribe()

	ev := testenv.Token("app", "ann", "read")
	newer := testenv.Token("app", "ann", "read")
	done := make(chan error, 1)
	go func() {
		done <- recovery.PublishDeactivations(context.Background(), js, topo,
			[]recovery.Superseded{{Digest: ev.TokenDigest, By: newer.TokenDigest, Key: recovery.KeyOf(ev)}})
	}()
	if _, err := sub.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("the notice was not published: %v", err)
	}
	// A bound for the test only, far above the notice timeout.
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("an unacknowledged notice was reported as published")
		}
		t.Logf("gave up with: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("still waiting for an acknowledgement after a minute")
	}
}
