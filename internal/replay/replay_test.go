package replay_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/dev/bench"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
)

func runReplay(t *testing.T, p *pipetest.Pipeline, o replay.Options) *replay.Summary {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sum, err := replay.Run(ctx, p.Writer(t), o)
	testenv.Must(t, err, "replay")
	p.AssertDurablesOnly(t)
	return sum
}

func publishAll(t *testing.T, p *pipetest.Pipeline, evs ...*events.TokenIssued) []uint64 {
	t.Helper()
	seqs := make([]uint64, len(evs))
	for i, ev := range evs {
		seqs[i] = testenv.Publish(t, p.JS, p.Topo, ev)
	}
	return seqs
}

func hexes(evs ...*events.TokenIssued) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = ev.TokenDigest.String()
	}
	return out
}

func assertTable(t *testing.T, got, want []pipetest.Row) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("table has %d rows, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("row %d:\n got  %+v\n want %+v", i, got[i], want[i])
		}
	}
}

// keyedEvents returns three tokens of one key (oldest first), two of
// another, and n tokens of keys of their own.
func keyedEvents(n int) (three, two, singles []*events.TokenIssued) {
	for range 3 {
		three = append(three, testenv.Token("app", "alice", "read"))
	}
	for range 2 {
		two = append(two, testenv.Token("app", "bob", "read", "write"))
	}
	for range n {
		singles = append(singles, testenv.Token("app", testenv.Name("user-"), "read"))
	}
	return three, two, singles
}

func TestReplayOfPersistedEventsChangesNothing(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Start(t, 2)
	three, two, singles := keyedEvents(20)
	all := slices.Concat(three, two, singles)
	publishAll(t, p, all...)
	p.Drained(t)
	before := p.Table(t)
	var writtenBefore time.Time
	testenv.Must(t, p.Pool.QueryRow(context.Background(), "SELECT max(greatest(persisted_at, state_changed_at)) FROM tokens").Scan(&writtenBefore), "last write")
	notices := p.SubjectCount(t, p.Topo.DeactivatedSubject())

	sum := runReplay(t, p, replay.Options{})

	assertTable(t, p.Table(t), before)
	var writtenAfter time.Time
	testenv.Must(t, p.Pool.QueryRow(context.Background(), "SELECT max(greatest(persisted_at, state_changed_at)) FROM tokens").Scan(&writtenAfter), "last write")
	if !writtenAfter.Equal(writtenBefore) {
		t.Errorf("a row was written or changed: last write %s, was %s", writtenAfter, writtenBefore)
	}
	if n := p.SubjectCount(t, p.Topo.DeactivatedSubject()); n != notices {
		t.Errorf("deactivation notices = %d, want %d (nothing deactivated)", n, notices)
	}
	if sum.Processed != int64(len(all)) || sum.Present != int64(len(all)) || sum.Inserted+sum.Resolved+sum.Poison != 0 {
		t.Fatalf("summary = %+v, want all %d present", sum, len(all))
	}
}

func TestReplayAfterDeletingRowsRestoresThemWithTheirStates(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Start(t, 2)
	three, two, singles := keyedEvents(30)
	all := slices.Concat(three, two, singles)
	publishAll(t, p, all...)
	p.Drained(t)
	before := p.Table(t)
	states := p.States(t)
	if states[three[2].TokenDigest] != "ACTIVE" || states[three[0].TokenDigest] != "INACTIVE" || states[two[0].TokenDigest] != "INACTIVE" {
		t.Fatalf("pipeline states unexpected: %v", states)
	}
	// The ACTIVE and an INACTIVE row of the three-token key, both rows of
	// the two-token key, and some singles.
	gone := slices.Concat(hexes(three[0], three[2]), hexes(two...), hexes(singles[:5]...))
	p.Exec(t, "DELETE FROM tokens WHERE encode(token_digest, 'hex') = ANY($1)", gone)

	sum := runReplay(t, p, replay.Options{BatchSize: 7}) // small batches: keys span batches

	assertTable(t, p.Table(t), before)
	if sum.Inserted+sum.Resolved != int64(len(gone)) || sum.Present != int64(len(all)-len(gone)) {
		t.Fatalf("summary = %+v, want %d restored and %d present", sum, len(gone), len(all)-len(gone))
	}
}

// TestReplayAfterBackupRestoreResolvesThroughRecovery: a database restored
// from a backup has an older token ACTIVE; replaying from the backup point
// brings the newer one back, which conflicts and goes through recovery's
// rule in-process.
func TestReplayAfterBackupRestoreResolvesThroughRecovery(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	stop := p.Start(t, 1)
	a, b, c := testenv.Token("app", "carol", "read"), testenv.Token("app", "carol", "read"), testenv.Token("app", "carol", "read")
	publishAll(t, p, a, b)
	p.Drained(t)
	seqC := testenv.Publish(t, p.JS, p.Topo, c)
	p.Drained(t)
	before := p.Table(t)
	stop()
	// The backup was taken before c: b is ACTIVE there and c has no row.
	p.Exec(t, "DELETE FROM tokens WHERE token_digest = $1", c.TokenDigest[:])
	p.Exec(t, "UPDATE tokens SET state = 'ACTIVE' WHERE token_digest = $1", b.TokenDigest[:])

	sum := runReplay(t, p, replay.Options{FromSeq: seqC})

	assertTable(t, p.Table(t), before)
	if sum.Resolved != 1 || sum.Deactivated != 1 || sum.Processed != 1 {
		t.Fatalf("summary = %+v, want one conflict resolved, one token deactivated", sum)
	}
	stream, err := p.JS.Stream(context.Background(), p.Topo.Stream)
	testenv.Must(t, err, "stream")
	msg, err := stream.GetLastMsgForSubject(context.Background(), p.Topo.DeactivatedSubject())
	testenv.Must(t, err, "deactivation notice")
	notice, err := events.DecodeTokenDeactivated(msg.Data)
	testenv.Must(t, err, "decode notice")
	if notice.TokenDigest != b.TokenDigest || notice.SupersededBy != c.TokenDigest {
		t.Fatalf("notice = %+v, want b superseded by c", notice)
	}
}

func TestReplayingOldEventsNeverReactivatesAnOlderToken(t *testing.T) {
	t.Parallel()
	for _, newerState := range []string{"REVOKED", "INACTIVE"} {
		t.Run(newerState, func(t *testing.T) {
			t.Parallel()
			p := pipetest.New(t)
			stop := p.Start(t, 1)
			older, newer := testenv.Token("app", "dave", "read"), testenv.Token("app", "dave", "read")
			publishAll(t, p, older, newer)
			p.Drained(t)
			stop()
			p.Exec(t, "UPDATE tokens SET state = $1 WHERE token_digest = $2", newerState, newer.TokenDigest[:])
			p.Exec(t, "DELETE FROM tokens WHERE token_digest = $1", older.TokenDigest[:])

			sum := runReplay(t, p, replay.Options{})

			got := p.States(t)
			if got[older.TokenDigest] != "INACTIVE" || got[newer.TokenDigest] != newerState {
				t.Fatalf("older %q, newer %q; want older INACTIVE, newer %s", got[older.TokenDigest], got[newer.TokenDigest], newerState)
			}
			if sum.Inserted != 1 || sum.Present != 1 {
				t.Fatalf("summary = %+v", sum)
			}
		})
	}
}

// TestReplayOverlappingLiveTraffic replays ranges while the workers are
// persisting the same events and new tokens keep arriving for the same keys:
// replay and pipeline race for every row and every key.
func TestReplayOverlappingLiveTraffic(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	keys := make([]string, 25)
	for i := range keys {
		keys[i] = testenv.Name("user-")
	}
	var (
		mu      sync.Mutex
		digests []events.Digest
		pubErr  error
	)
	// Publishing is driven by counts, not time, so a busy machine cannot cut
	// it short: at least 10 tokens per key, and on until both replays ran.
	const minEvents = 250
	publishing := make(chan struct{})
	replaysDone := make(chan struct{})
	stopPublishing := sync.OnceFunc(func() { close(replaysDone) })
	goOn := func(i int) bool {
		select {
		case <-replaysDone:
			return i < minEvents
		default:
			return true
		}
	}
	go func() {
		defer close(publishing)
		ctx := context.Background()
		for i := 0; goOn(i); i++ {
			ev := testenv.Token("app", keys[i%len(keys)], "read")
			body, err := events.EncodeTokenIssued(ev)
			if err == nil {
				_, err = p.JS.Publish(ctx, p.Topo.IssuedSubject(), body, jetstream.WithMsgID(ev.TokenDigest.String()))
			}
			mu.Lock()
			if err != nil {
				pubErr = err
				mu.Unlock()
				return
			}
			digests = append(digests, ev.TokenDigest)
			mu.Unlock()
		}
	}()
	defer func() { stopPublishing(); <-publishing }()
	// A backlog builds up; then the workers and a replay start on it at
	// once, and a second replay with more workers follows while publishing
	// goes on.
	published := func(n int) func() (bool, error) {
		return func() (bool, error) {
			mu.Lock()
			defer mu.Unlock()
			return len(digests) >= n || pubErr != nil, nil
		}
	}
	testenv.Eventually(t, 2*time.Minute, "a backlog of 100 events", published(100))
	p.Start(t, 2)
	first := runReplay(t, p, replay.Options{BatchSize: 20})
	mu.Lock()
	base := len(digests)
	mu.Unlock()
	testenv.Eventually(t, 2*time.Minute, "more events after the first replay", published(base+50))
	second := runReplay(t, p, replay.Options{BatchSize: 20, Workers: 4})
	stopPublishing()
	<-publishing
	if pubErr != nil {
		t.Fatalf("publish: %v", pubErr)
	}
	p.Drained(t)

	stream, err := p.JS.Stream(context.Background(), p.Topo.Stream)
	testenv.Must(t, err, "stream")
	report, err := audit.Check(context.Background(), p.Pool, digests, stream, p.Topo.Persister, p.Topo.Recovery)
	testenv.Must(t, err, "audit")
	if !report.Clean() {
		var sb strings.Builder
		report.Write(&sb)
		t.Fatalf("audit after replay over live traffic:\n%s", sb.String())
	}
	if n := p.Count(t, "SELECT count(*) FROM tokens"); n != len(digests) {
		t.Fatalf("rows = %d, want one per token (%d)", n, len(digests))
	}
	if n := p.Count(t, "SELECT count(*) FROM (SELECT 1 FROM tokens WHERE state = 'ACTIVE' GROUP BY client_id, subject, scope HAVING count(*) > 1) x"); n != 0 {
		t.Fatalf("%d keys with more than one ACTIVE row", n)
	}
	if n := p.Count(t, "SELECT count(DISTINCT (client_id, subject, scope)) FROM tokens WHERE state = 'ACTIVE'"); n != len(keys) {
		t.Fatalf("%d keys have an ACTIVE row, want all %d", n, len(keys))
	}
	t.Logf("published %d over %d keys; replay 1 read %d (inserted %d, resolved %d, present %d); replay 2 read %d (inserted %d, resolved %d, present %d)",
		len(digests), len(keys), first.Processed, first.Inserted, first.Resolved, first.Present,
		second.Processed, second.Inserted, second.Resolved, second.Present)
	if first.Processed == 0 || second.Processed < first.Processed {
		t.Fatalf("replays read %d then %d events", first.Processed, second.Processed)
	}
}

func TestInterruptedReplayLeavesNoConsumerAndResumes(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	const n = 20000
	evs := bench.MakeEvents(n)
	testenv.Must(t, bench.Fill(context.Background(), p.JS, p.Topo, evs, nil), "fill")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sum, err := replay.Run(ctx, p.Writer(t), replay.Options{
		Workers: 1, BatchSize: 200, ProgressEvery: 5 * time.Millisecond,
		Progress: func(pr replay.Progress) {
			if pr.Done >= 1000 {
				cancel()
			}
		},
	})
	if !errors.Is(err, context.Canceled) || !sum.Interrupted {
		t.Fatalf("err = %v, interrupted = %v; want an interruption", err, sum.Interrupted)
	}
	p.AssertDurablesOnly(t)
	if sum.ResumeFrom <= 1 || sum.ResumeFrom > n {
		t.Fatalf("resume from %d", sum.ResumeFrom)
	}
	// Everything before the resume point has its row.
	if got := p.Count(t, "SELECT count(*) FROM tokens WHERE stream_seq < $1", int64(sum.ResumeFrom)); got != int(sum.ResumeFrom-1) {
		t.Fatalf("%d rows before seq %d, want %d", got, sum.ResumeFrom, sum.ResumeFrom-1)
	}
	t.Logf("interrupted after %d events; resuming from %d", sum.Processed, sum.ResumeFrom)

	rest := runReplay(t, p, replay.Options{FromSeq: sum.ResumeFrom})
	if rest.Interrupted || p.Count(t, "SELECT count(*) FROM tokens") != n {
		t.Fatalf("after resuming: %+v, rows %d", rest, p.Count(t, "SELECT count(*) FROM tokens"))
	}
}

func TestDryRunReportsWithoutWriting(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	stop := p.Start(t, 1)
	_, _, singles := keyedEvents(10)
	publishAll(t, p, singles...)
	testenv.PublishRaw(t, p.JS, p.Topo.IssuedSubject(), []byte("garbage"))
	p.Drained(t)
	stop()
	p.Exec(t, "DELETE FROM tokens WHERE encode(token_digest, 'hex') = ANY($1)", hexes(singles[:4]...))
	before := p.Table(t)
	dead := p.SubjectCount(t, p.Topo.DeadSubject())

	sum := runReplay(t, p, replay.Options{DryRun: true})

	assertTable(t, p.Table(t), before)
	if sum.Inserted != 4 || sum.Present != 6 || sum.Poison != 1 || sum.DeadLettered != 0 {
		t.Fatalf("summary = %+v, want 4 would insert, 6 present, 1 poison", sum)
	}
	if got := p.SubjectCount(t, p.Topo.DeadSubject()); got != dead {
		t.Fatalf("dry run changed dead letters: %d, was %d", got, dead)
	}
}

func TestReplaySelectsRangesBySequenceAndTime(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	_, _, evs := keyedEvents(10)
	publishAll(t, p, evs[:5]...)
	time.Sleep(50 * time.Millisecond)
	mid := time.Now()
	time.Sleep(50 * time.Millisecond)
	publishAll(t, p, evs[5:]...)
	seqs := func() []int64 {
		rows, err := p.Pool.Query(context.Background(), "SELECT stream_seq FROM tokens ORDER BY 1")
		testenv.Must(t, err, "seqs")
		defer rows.Close()
		var out []int64
		for rows.Next() {
			var s int64
			testenv.Must(t, rows.Scan(&s), "scan")
			out = append(out, s)
		}
		return out
	}

	runReplay(t, p, replay.Options{FromSeq: 2, ToSeq: 4})
	if got := seqs(); !slices.Equal(got, []int64{2, 3, 4}) {
		t.Fatalf("--from-seq 2 --to-seq 4 wrote %v", got)
	}
	runReplay(t, p, replay.Options{Since: mid})
	if got := seqs(); !slices.Equal(got, []int64{2, 3, 4, 6, 7, 8, 9, 10}) {
		t.Fatalf("--since wrote %v", got)
	}
	sum := runReplay(t, p, replay.Options{Until: mid})
	if got := seqs(); !slices.Equal(got, []int64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) || sum.Inserted != 2 || sum.Processed != 5 {
		t.Fatalf("--until wrote %v (%+v)", got, sum)
	}
	empty := runReplay(t, p, replay.Options{FromSeq: 11})
	if empty.Processed != 0 {
		t.Fatalf("a range past the end read %d events", empty.Processed)
	}
}

func TestReplayDeadLettersPoisonOnce(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	good := testenv.Token("app", "erin", "read")
	testenv.Publish(t, p.JS, p.Topo, good)
	poisonSeq := testenv.PublishRaw(t, p.JS, p.Topo.IssuedSubject(), []byte("{not json"))

	sum := runReplay(t, p, replay.Options{})
	if sum.Inserted != 1 || sum.Poison != 1 || sum.DeadLettered != 1 {
		t.Fatalf("summary = %+v", sum)
	}
	stream, err := p.JS.Stream(context.Background(), p.Topo.Stream)
	testenv.Must(t, err, "stream")
	dl, err := stream.GetLastMsgForSubject(context.Background(), p.Topo.DeadSubject())
	testenv.Must(t, err, "dead letter")
	h := dl.Header
	if h.Get(events.HeaderOriginSubject) != p.Topo.IssuedSubject() || h.Get(events.HeaderOriginSeq) != strconv.FormatUint(poisonSeq, 10) || h.Get(events.HeaderReason) == "" || string(dl.Data) != "{not json" {
		t.Fatalf("dead letter headers %v body %q (poison was seq %d)", h, dl.Data, poisonSeq)
	}

	// Again, and again with the pipeline having dead-lettered it too: still
	// one copy.
	again := runReplay(t, p, replay.Options{})
	p.Start(t, 1)
	p.Drained(t)
	third := runReplay(t, p, replay.Options{})
	if again.DeadLettered != 0 || third.DeadLettered != 0 || again.Poison != 1 {
		t.Fatalf("repeat replays dead-lettered %d and %d", again.DeadLettered, third.DeadLettered)
	}
	if n := p.SubjectCount(t, p.Topo.DeadSubject()); n != 1 {
		t.Fatalf("dead letters = %d, want 1", n)
	}
}

// TestReplayOfConflictSubjectUsesOriginSequence: conflict copies carry the
// sequence of the original event; that, not the copy's, orders the key.
func TestReplayOfConflictSubjectUsesOriginSequence(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	stop := p.Start(t, 1)
	older := testenv.Token("app", "frank", "read")
	testenv.Publish(t, p.JS, p.Topo, older)
	p.Drained(t)
	newer := testenv.Token("app", "frank", "read")
	newerSeq := testenv.Publish(t, p.JS, p.Topo, newer)
	p.Drained(t)
	stop()
	if p.SubjectCount(t, p.Topo.ConflictSubject()) != 1 {
		t.Fatal("the newer token did not go through the conflict subject")
	}
	p.Exec(t, "DELETE FROM tokens WHERE token_digest = $1", newer.TokenDigest[:])
	p.Exec(t, "UPDATE tokens SET state = 'ACTIVE' WHERE token_digest = $1", older.TokenDigest[:])

	sum := runReplay(t, p, replay.Options{Subject: p.Topo.ConflictSubject()})

	if got := p.Count(t, "SELECT stream_seq FROM tokens WHERE token_digest = $1", newer.TokenDigest[:]); got != int(newerSeq) {
		t.Fatalf("stream_seq = %d, want the original %d", got, newerSeq)
	}
	if st := p.States(t); st[newer.TokenDigest] != "ACTIVE" || st[older.TokenDigest] != "INACTIVE" || sum.Resolved != 1 {
		t.Fatalf("states %v, summary %+v", st, sum)
	}
}

func TestOptionsAreChecked(t *testing.T) {
	t.Parallel()
	topo := testenv.Topology()
	w := &replay.Writer{Topology: topo}
	cases := map[string]replay.Options{
		"dead subject":     {Subject: topo.DeadSubject()},
		"foreign subject":  {Subject: "other.issued"},
		"two starts":       {FromSeq: 3, Since: time.Now()},
		"two ends":         {ToSeq: 3, Until: time.Now()},
		"from after to":    {FromSeq: 9, ToSeq: 3},
		"negative workers": {Workers: -1},
	}
	for name, o := range cases {
		if _, err := replay.Run(context.Background(), w, o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseTime(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 3, 4, 12, 0, 0, 0, time.UTC)
	cases := map[string]time.Time{
		"2h":                   now.Add(-2 * time.Hour),
		"90m":                  now.Add(-90 * time.Minute),
		"3d":                   now.Add(-72 * time.Hour),
		"2026-03-01T10:00:00Z": time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC),
	}
	for in, want := range cases {
		got, err := replay.ParseTime(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("ParseTime(%q) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "yesterday", "-2h", "2026-03-01"} {
		if _, err := replay.ParseTime(bad, now); err == nil {
			t.Errorf("ParseTime(%q) accepted", bad)
		}
	}
}

// TestReplayOfPartitionedStreamRestoresEveryPartition: by default replay
// reads every partition's subject, not only the unpartitioned one.
func TestReplayOfPartitionedStreamRestoresEveryPartition(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Partition(t, 4)
	p.Start(t, 2)
	three, two, singles := keyedEvents(30)
	all := slices.Concat(three, two, singles)
	publishAll(t, p, all...)
	p.Drained(t)
	before := p.Table(t)
	p.Exec(t, "DELETE FROM tokens")

	sum := runReplay(t, p, replay.Options{BatchSize: 7})

	assertTable(t, p.Table(t), before)
	if sum.Subject != p.Topo.Prefix+".issued.*" || sum.Inserted+sum.Resolved != int64(len(all)) {
		t.Fatalf("summary = %+v, want all %d restored from %s.issued.*", sum, len(all), p.Topo.Prefix)
	}
}
