package persister_test

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
)

// pipeline is the shared in-process pipeline with short field names for
// these tests.
type pipeline struct {
	*pipetest.Pipeline
	pool *pgxpool.Pool
	js   jetstream.JetStream
	topo events.Topology
}

func newPipeline(t *testing.T) *pipeline {
	t.Helper()
	pt := pipetest.New(t)
	return &pipeline{Pipeline: pt, pool: pt.Pool, js: pt.JS, topo: pt.Topo}
}

// start runs a persister pool and a recovery consumer until the test ends.
func (p *pipeline) start(t *testing.T, workers int) { p.Start(t, workers) }

// states returns token digest -> state for every row.
func (p *pipeline) states(t *testing.T) map[events.Digest]string { return p.States(t) }

// count runs a query returning one integer.
func (p *pipeline) count(t *testing.T, sql string, args ...any) int { return p.Count(t, sql, args...) }

// drained waits until both durable consumers have nothing pending.
func (p *pipeline) drained(t *testing.T) { p.Drained(t) }

func TestPersistsEventsAndRacesResolveToNewest(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	// Three racing tokens for one key, and an unrelated token.
	a := testenv.Token("app", "alice", "read")
	b := testenv.Token("app", "alice", "read")
	c := testenv.Token("app", "alice", "read")
	other := testenv.Token("app", "bob", "read", "write")
	for _, ev := range []*events.TokenIssued{a, b, c, other} {
		testenv.Publish(t, p.js, p.topo, ev)
	}
	p.start(t, 2)
	p.drained(t)
	got := p.states(t)
	want := map[events.Digest]string{a.TokenDigest: "INACTIVE", b.TokenDigest: "INACTIVE", c.TokenDigest: "ACTIVE", other.TokenDigest: "ACTIVE"}
	assertStates(t, got, want)
}

func TestConflictWithStoredActiveGoesThroughRecovery(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	p.start(t, 1)
	old := testenv.Token("app", "carol", "read")
	testenv.Publish(t, p.js, p.topo, old)
	p.drained(t)
	assertStates(t, p.states(t), map[events.Digest]string{old.TokenDigest: "ACTIVE"})

	newer := testenv.Token("app", "carol", "read")
	testenv.Publish(t, p.js, p.topo, newer)
	p.drained(t)
	assertStates(t, p.states(t), map[events.Digest]string{old.TokenDigest: "INACTIVE", newer.TokenDigest: "ACTIVE"})

	// Recovery announced the deactivation for gateways.
	stream, err := p.js.Stream(context.Background(), p.topo.Stream)
	testenv.Must(t, err, "stream")
	msg, err := stream.GetLastMsgForSubject(context.Background(), p.topo.DeactivatedSubject())
	testenv.Must(t, err, "read deactivation notice")
	notice, err := events.DecodeTokenDeactivated(msg.Data)
	testenv.Must(t, err, "decode notice")
	if notice.TokenDigest != old.TokenDigest || notice.SupersededBy != newer.TokenDigest {
		t.Fatalf("notice = %+v, want %s superseded by %s", notice, old.TokenDigest, newer.TokenDigest)
	}
}

func TestSameEventTwiceLeavesOneRow(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	ev := testenv.Token("app", "dave", "read")
	body, err := events.EncodeTokenIssued(ev)
	testenv.Must(t, err, "encode")
	// Published twice without a message id, as a replay past the duplicate
	// window would: two stream messages, one token.
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), body)
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), body)
	p.start(t, 2)
	p.drained(t)
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), body) // and once more after it was stored
	p.drained(t)
	if n := p.count(t, "SELECT count(*) FROM tokens"); n != 1 {
		t.Fatalf("rows = %d, want 1", n)
	}
	assertStates(t, p.states(t), map[events.Digest]string{ev.TokenDigest: "ACTIVE"})
}

func TestUnackedBatchIsRedeliveredAfterWorkerDies(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	// Shorten AckWait so the test need not wait 30 s for redelivery.
	cfg := p.topo.PersisterConsumerConfig()
	cfg.AckWait = 2 * time.Second
	ctx := context.Background()
	stream, err := p.js.Stream(ctx, p.topo.Stream)
	testenv.Must(t, err, "stream")
	cons, err := stream.CreateOrUpdateConsumer(ctx, cfg)
	testenv.Must(t, err, "consumer")

	var sent []*events.TokenIssued
	for i := 0; i < 50; i++ {
		ev := testenv.Token("app", testenv.Name("user-"), "read")
		testenv.Publish(t, p.js, p.topo, ev)
		sent = append(sent, ev)
	}
	// A worker takes the batch and dies before committing: no ack, no nak.
	batch, err := cons.Fetch(50, jetstream.FetchMaxWait(2*time.Second))
	testenv.Must(t, err, "fetch")
	taken := 0
	for range batch.Messages() {
		taken++
	}
	if taken != 50 {
		t.Fatalf("dead worker took %d messages, want 50", taken)
	}
	p.start(t, 1)
	p.drained(t)
	got := p.states(t)
	for _, ev := range sent {
		if got[ev.TokenDigest] != "ACTIVE" {
			t.Fatalf("token %s has state %q after redelivery, want ACTIVE", ev.TokenDigest, got[ev.TokenDigest])
		}
	}
	if len(got) != len(sent) {
		t.Fatalf("rows = %d, want %d", len(got), len(sent))
	}
}

func TestPoisonIsDeadLetteredWhileBatchCommits(t *testing.T) {
	t.Parallel()
	p := newPipeline(t)
	good1 := testenv.Token("app", "erin", "read")
	good2 := testenv.Token("app", "frank", "read")
	unknownVersion, _ := json.Marshal(map[string]any{"v": 99, "type": events.TypeTokenIssued})
	nul := testenv.Token("app", "x\x00y", "read") // valid JSON, impossible in a text column
	nulBody, _ := json.Marshal(nul)
	testenv.Publish(t, p.js, p.topo, good1)
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), []byte("{not json"))
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), unknownVersion)
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), nulBody)
	// Oversized: accepted by the stream (its limit is twice ours), refused by
	// the decoder before any parsing.
	oversized := append([]byte(`{"v":1,"pad":"`), append(bytes.Repeat([]byte("x"), events.MaxEventBytes+1), '"', '}')...)
	testenv.PublishRaw(t, p.js, p.topo.IssuedSubject(), oversized)
	testenv.Publish(t, p.js, p.topo, good2)
	p.start(t, 1)
	p.drained(t)
	assertStates(t, p.states(t), map[events.Digest]string{good1.TokenDigest: "ACTIVE", good2.TokenDigest: "ACTIVE"})

	info, err := p.js.Stream(context.Background(), p.topo.Stream)
	testenv.Must(t, err, "stream")
	si, err := info.Info(context.Background(), jetstream.WithSubjectFilter(p.topo.DeadSubject()))
	testenv.Must(t, err, "stream info")
	if n := si.State.Subjects[p.topo.DeadSubject()]; n != 4 {
		t.Fatalf("dead letters = %d, want 4", n)
	}
	last, err := info.GetLastMsgForSubject(context.Background(), p.topo.DeadSubject())
	testenv.Must(t, err, "last dead letter")
	if last.Header.Get(events.HeaderReason) == "" || last.Header.Get(events.HeaderOriginSeq) == "" {
		t.Fatalf("dead letter lacks reason or origin headers: %v", last.Header)
	}
}

func assertStates(t *testing.T, got, want map[events.Digest]string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d rows, want %d: %v", len(got), len(want), got)
	}
	for d, s := range want {
		if got[d] != s {
			t.Errorf("token %s: state %q, want %q", d.String()[:12], got[d], s)
		}
	}
}
