package dlq_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/dlq"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
)

// publishDead puts a dead letter on the dead subject as the stream pool's dead-letter path
// would have.
func publishDead(t *testing.T, p *pipetest.Pipeline, body []byte, originSubject string, originSeq uint64, reason string) uint64 {
	t.Helper()
	m := nats.NewMsg(p.Topo.DeadSubject())
	m.Data = body
	m.Header.Set(events.HeaderReason, reason)
	m.Header.Set(events.HeaderOriginSubject, originSubject)
	m.Header.Set(events.HeaderOriginSeq, strconv.FormatUint(originSeq, 10))
	ack, err := p.JS.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish dead letter")
	return ack.Sequence
}

func encode(t *testing.T, ev *events.TokenIssued) []byte {
	t.Helper()
	body, err := events.EncodeTokenIssued(ev)
	testenv.Must(t, err, "encode")
	return body
}

func list(t *testing.T, p *pipetest.Pipeline) []dlq.Letter {
	t.Helper()
	letters, err := dlq.List(context.Background(), p.JS, p.Topo)
	testenv.Must(t, err, "list")
	p.AssertDurablesOnly(t)
	return letters
}

func TestPoisonLandsInDeadSubjectAndIsListed(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Start(t, 1)
	good := testenv.Token("app", "alice", "read")
	testenv.Publish(t, p.JS, p.Topo, good)
	garbageSeq := testenv.PublishRaw(t, p.JS, p.Topo.IssuedSubject(), []byte("{not json"))
	// A newer issuer's event: decodes as JSON, refused for its version.
	future := testenv.Token("app", "bob", "read", "write")
	var m map[string]any
	testenv.Must(t, json.Unmarshal(encode(t, future), &m), "unmarshal")
	m["v"] = 2
	futureBody, _ := json.Marshal(m)
	futureSeq := testenv.PublishRaw(t, p.JS, p.Topo.IssuedSubject(), futureBody)
	p.Drained(t)

	letters := list(t, p)
	if len(letters) != 2 {
		t.Fatalf("dead letters = %d, want 2", len(letters))
	}
	for i, wantSeq := range []uint64{garbageSeq, futureSeq} {
		l := letters[i]
		if l.OriginSubject != p.Topo.IssuedSubject() || l.OriginSeq != wantSeq || l.Reason == "" || l.Time.IsZero() {
			t.Errorf("letter %d = %+v, want origin %s#%d with a reason", i, l, p.Topo.IssuedSubject(), wantSeq)
		}
	}
	if _, ok := letters[0].Key(); ok {
		t.Error("garbage decoded to a key")
	}
	k, ok := letters[1].Key()
	if !ok || k.ClientID != "app" || k.Subject != "bob" || k.Scope != "read write" || k.Digest != future.TokenDigest.String()[:12] {
		t.Errorf("key = %+v, %v", k, ok)
	}

	var out bytes.Buffer
	dlq.WriteList(&out, letters)
	text := out.String()
	for _, want := range []string{strconv.FormatUint(letters[0].Seq, 10), "unsupported event version 2", future.TokenDigest.String()[:12], "2 dead letters"} {
		if !strings.Contains(text, want) {
			t.Errorf("list lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, future.TokenDigest.String()) {
		t.Errorf("list shows a whole digest:\n%s", text)
	}
}

func TestShowPrintsHeadersAndBodyButNoSecrets(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	ev := testenv.Token("app", "carol", "read")
	var m map[string]any
	testenv.Must(t, json.Unmarshal(encode(t, ev), &m), "unmarshal")
	m["plaintext"] = "s3cr3t-token-value"
	body, _ := json.Marshal(m)
	seq := publishDead(t, p, body, p.Topo.IssuedSubject(), 1, "unknown field \"plaintext\"")

	l, err := dlq.Get(context.Background(), p.JS, p.Topo, seq)
	testenv.Must(t, err, "get")
	var out bytes.Buffer
	dlq.WriteLetter(&out, l)
	text := out.String()
	for _, want := range []string{events.HeaderReason, events.HeaderOriginSeq, `"client_id": "app"`, `"plaintext"`, ev.TokenDigest.String()[:12] + "..."} {
		if !strings.Contains(text, want) {
			t.Errorf("show lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "s3cr3t") || strings.Contains(text, ev.TokenDigest.String()) {
		t.Errorf("show prints a secret or a whole digest:\n%s", text)
	}

	issued := testenv.Publish(t, p.JS, p.Topo, testenv.Token("app", "dave", "read"))
	if _, err := dlq.Get(context.Background(), p.JS, p.Topo, issued); !errors.Is(err, dlq.ErrNotDeadLetter) {
		t.Fatalf("get of an issued event: %v", err)
	}
	if _, err := dlq.Get(context.Background(), p.JS, p.Topo, 999); !errors.Is(err, dlq.ErrNotDeadLetter) {
		t.Fatalf("get of a missing sequence: %v", err)
	}
}

// TestReplayPersistsFixedDeadLetters simulates a decoding bug since fixed:
// valid events sit in the dead subject with the origin of their issued
// event. Replay writes them with that origin sequence, so an old one lands
// INACTIVE under a newer token, and leaves real poison where it is.
func TestReplayPersistsFixedDeadLetters(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Start(t, 1)
	older := testenv.Token("app", "erin", "read")
	other := testenv.Token("app", "frank", "read")
	// The original events' sequences, taken on a subject no consumer reads.
	olderSeq := testenv.PublishRaw(t, p.JS, p.Topo.Prefix+".original", encode(t, older))
	otherSeq := testenv.PublishRaw(t, p.JS, p.Topo.Prefix+".original", encode(t, other))
	newer := testenv.Token("app", "erin", "read")
	testenv.Publish(t, p.JS, p.Topo, newer)
	testenv.PublishRaw(t, p.JS, p.Topo.IssuedSubject(), []byte("still garbage"))
	p.Drained(t)
	publishDead(t, p, encode(t, older), p.Topo.IssuedSubject(), olderSeq, "decode token.issued: bug 123")
	publishDead(t, p, encode(t, other), p.Topo.IssuedSubject(), otherSeq, "decode token.issued: bug 123")
	letters := list(t, p)
	if len(letters) != 3 {
		t.Fatalf("dead letters = %d, want 3", len(letters))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := dlq.Replay(ctx, p.Writer(t), letters, false)
	testenv.Must(t, err, "replay")
	var out bytes.Buffer
	dlq.WriteReport(&out, rep)
	t.Log(out.String())

	st := p.States(t)
	if st[older.TokenDigest] != "INACTIVE" || st[newer.TokenDigest] != "ACTIVE" || st[other.TokenDigest] != "ACTIVE" {
		t.Fatalf("states: older %q newer %q other %q", st[older.TokenDigest], st[newer.TokenDigest], st[other.TokenDigest])
	}
	if got := p.Count(t, "SELECT stream_seq FROM tokens WHERE token_digest = $1", older.TokenDigest[:]); got != int(olderSeq) {
		t.Fatalf("stream_seq = %d, want the origin %d", got, olderSeq)
	}
	if rep.Outcomes[0].Persisted || !strings.Contains(rep.Outcomes[0].Detail, "still poison") || !rep.Outcomes[1].Removed || !rep.Outcomes[2].Removed {
		t.Fatalf("outcomes = %+v", rep.Outcomes)
	}
	left := list(t, p)
	if len(left) != 1 || left[0].Seq != letters[0].Seq {
		t.Fatalf("left %+v, want only the garbage", left)
	}
	// Replaying again is harmless.
	again, err := dlq.Replay(ctx, p.Writer(t), left, false)
	testenv.Must(t, err, "replay again")
	if again.Outcomes[0].Persisted {
		t.Fatal("garbage persisted")
	}
}

// TestReplayOfDeadConflictUsesOriginalSequence: recovery dead-letters the
// conflict copy, whose own sequence is not the event's; the copy's header
// holds the original.
func TestReplayOfDeadConflictUsesOriginalSequence(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	ev := testenv.Token("app", "gina", "read")
	origSeq := testenv.PublishRaw(t, p.JS, p.Topo.Prefix+".original", encode(t, ev))
	m := nats.NewMsg(p.Topo.ConflictSubject())
	m.Data = encode(t, ev)
	m.Header.Set(events.HeaderOriginSeq, strconv.FormatUint(origSeq, 10))
	ack, err := p.JS.PublishMsg(context.Background(), m)
	testenv.Must(t, err, "publish conflict copy")
	publishDead(t, p, encode(t, ev), p.Topo.ConflictSubject(), ack.Sequence, "bug in recovery")
	gone := publishDead(t, p, encode(t, testenv.Token("app", "hal", "read")), p.Topo.ConflictSubject(), 9999, "bug in recovery")

	rep, err := dlq.Replay(context.Background(), p.Writer(t), list(t, p), true)
	testenv.Must(t, err, "replay")
	if got := p.Count(t, "SELECT stream_seq FROM tokens WHERE token_digest = $1", ev.TokenDigest[:]); got != int(origSeq) {
		t.Fatalf("stream_seq = %d, want the original %d (the copy was %d)", got, origSeq, ack.Sequence)
	}
	if !rep.Outcomes[0].Persisted || rep.Outcomes[0].Removed || rep.Outcomes[1].Persisted || rep.Outcomes[1].Seq != gone {
		t.Fatalf("outcomes = %+v (keep set: nothing removed; a copy that is gone: left)", rep.Outcomes)
	}
	if n := len(list(t, p)); n != 2 {
		t.Fatalf("dead letters = %d, want both kept", n)
	}
}

func TestPurgeRemovesOnlyDeadLetters(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	for range 3 {
		testenv.Publish(t, p.JS, p.Topo, testenv.Token("app", testenv.Name("u-"), "read"))
	}
	publishDead(t, p, []byte("x"), p.Topo.IssuedSubject(), 1, "bad")
	publishDead(t, p, []byte("y"), p.Topo.IssuedSubject(), 2, "bad")

	n, err := dlq.Purge(context.Background(), p.JS, p.Topo)
	testenv.Must(t, err, "purge")
	if n != 2 {
		t.Fatalf("purged %d, want 2", n)
	}
	if d, i := p.SubjectCount(t, p.Topo.DeadSubject()), p.SubjectCount(t, p.Topo.IssuedSubject()); d != 0 || i != 3 {
		t.Fatalf("after purge: %d dead letters, %d issued events; want 0 and 3", d, i)
	}
	if left := list(t, p); len(left) != 0 {
		t.Fatalf("list after purge: %+v", left)
	}
}

// TestReplayOfDeadLetterFromPartition: a letter whose origin is a partition
// of the issued subject is re-driven like one from the unpartitioned subject.
func TestReplayOfDeadLetterFromPartition(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Partition(t, 4)
	p.Start(t, 1)
	ev := testenv.Token("app", "gina", "read")
	origin := p.Topo.IssuedSubjectOf(ev.ClientID, ev.Subject, ev.Scope())
	seq := testenv.PublishRaw(t, p.JS, p.Topo.Prefix+".original", encode(t, ev))
	p.Drained(t)
	publishDead(t, p, encode(t, ev), origin, seq, "decode token.issued: bug 123")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := dlq.Replay(ctx, p.Writer(t), list(t, p), false)
	testenv.Must(t, err, "replay")
	if len(rep.Outcomes) != 1 || !rep.Outcomes[0].Persisted {
		t.Fatalf("outcomes = %+v, want the letter from %s persisted", rep.Outcomes, origin)
	}
	if got := p.Count(t, "SELECT stream_seq FROM tokens WHERE token_digest = $1", ev.TokenDigest[:]); got != int(seq) {
		t.Fatalf("stream_seq = %d, want the origin %d", got, seq)
	}
}
