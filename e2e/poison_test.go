package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestPoisonMixedIntoStreamUnderLoad publishes poison into the stream while
// an issuer takes steady load: on the issued subject garbage, an unknown
// event version, a token event with a NUL in a field (valid JSON Postgres
// refuses) and an oversized body; on the conflict subject garbage and an
// event without its origin header. Every poison message is dead-lettered
// once, none stalls the batch it arrived in, none gets a row, and every
// token the issuer handed out has exactly one.
func TestPoisonMixedIntoStreamUnderLoad(t *testing.T) {
	t.Parallel()
	dbURL, pool := testenv.Database(t)
	_, js, topo := testenv.JetStream(t)
	scopes := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	addClient(t, pool, "poison-app", "poison-secret", scopes...)
	d := newDeployment(t, dbURL, topo)
	_, tokenURL := d.issuer("issuer")
	d.start("persister", "persister")
	d.start("recovery", "recovery")
	load := startLoad(t, 200, "poison-app", "poison-secret", scopes, tokenURL)

	unknownVersion, _ := json.Marshal(map[string]any{"v": 99, "type": events.TypeTokenIssued})
	oversized := append([]byte(`{"v":1,"pad":"`), append(bytes.Repeat([]byte("x"), events.MaxEventBytes+1), '"', '}')...)
	var nulDigests []events.Digest
	poison := 0
	for round := range 20 {
		nul := testenv.Token("poison-app", "x\x00"+itoa(round), "a")
		nulBody, _ := json.Marshal(nul)
		nulDigests = append(nulDigests, nul.TokenDigest)
		for _, body := range [][]byte{[]byte("{not json"), unknownVersion, nulBody, oversized} {
			testenv.PublishRaw(t, js, topo.IssuedSubject(), body)
			poison++
		}
		testenv.PublishRaw(t, js, topo.ConflictSubject(), []byte("\x00\x01"))
		good := testenv.Token("poison-app", "no-origin-"+itoa(round), "a")
		goodBody, _ := json.Marshal(good)
		testenv.PublishRaw(t, js, topo.ConflictSubject(), goodBody) // no origin header
		poison += 2
		time.Sleep(100 * time.Millisecond)
	}
	faultEnd := time.Now()
	time.Sleep(time.Second)
	digests, errs := load.finish()
	if len(errs) > 0 {
		t.Fatalf("requests failed while poison was in the stream: %v", errs)
	}
	auditUntilClean(t, "poison mixed into the stream: 120 poison messages among 200 req/s", int(load.sent.Load())+poison, digests, pool, js, topo, faultEnd)

	ctx := ctxT(t, 30*time.Second)
	stream, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(topo.DeadSubject()))
	testenv.Must(t, err, "stream info")
	if n := info.State.Subjects[topo.DeadSubject()]; n != uint64(poison) {
		t.Fatalf("dead letters = %d, want one per poison message (%d)", n, poison)
	}
	rep, err := audit.Check(context.Background(), pool, nulDigests, nil)
	testenv.Must(t, err, "audit the NUL events")
	if len(rep.Missing) != len(nulDigests) {
		t.Fatalf("%d of %d events with a NUL in a field got a row", len(nulDigests)-len(rep.Missing), len(nulDigests))
	}
}
