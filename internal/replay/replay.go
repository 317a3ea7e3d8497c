// Package replay re-drives a range of the token stream through the same
// persistence and recovery logic as the pipeline, for operators restoring a
// database or re-checking a window of history.
//
// A replay reads with an ordered consumer of its own, never the production
// durables, so it neither moves their offsets nor competes with them for
// messages, and it removes that consumer when it ends, however it ends. Every
// event keeps its ORIGINAL stream sequence, the one the one-ACTIVE rule
// orders by, so replaying old events can never reactivate an older token.
// Replaying is idempotent: a token that has a row is left as it is.
package replay

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
)

// Options choose the range and the pace of a replay.
type Options struct {
	// Range. At most one start (FromSeq or Since) and one end (ToSeq or
	// Until); zero values are open. The end is also capped at the stream's
	// last sequence when the replay starts, so a replay over live traffic
	// terminates.
	FromSeq, ToSeq uint64
	Since, Until   time.Time
	// Subject filters the stream; empty means the issued subject (every
	// partition's when the topology is partitioned). The
	// conflict subject works too (its messages carry their origin
	// sequence); other subjects in a wildcard are skipped.
	Subject string
	// DryRun reads the range and reports what would change without writing
	// anything, dead letters included.
	DryRun bool

	Workers   int           // concurrent batches; default 2
	BatchSize int           // events per batch (one transaction); default 1000
	Linger    time.Duration // longest wait to fill a batch; default 20ms
	// Finish bounds the batches in hand after ctx is cancelled; default 30s.
	Finish time.Duration

	// Progress, if set, is called every ProgressEvery (default 1s) and once
	// more at the end with Final set.
	Progress      func(Progress)
	ProgressEvery time.Duration
}

// Progress is a snapshot of a running replay.
type Progress struct {
	Done    int64 // messages handled
	Total   int64 // messages in the range when the replay started (estimate)
	LastSeq uint64
	Elapsed time.Duration
	Final   bool
}

// Rate is messages per second so far.
func (p Progress) Rate() float64 {
	if p.Elapsed <= 0 {
		return 0
	}
	return float64(p.Done) / p.Elapsed.Seconds()
}

// ETA estimates the time left, 0 if unknown.
func (p Progress) ETA() time.Duration {
	r := p.Rate()
	if r <= 0 || p.Total <= p.Done {
		return 0
	}
	return time.Duration(float64(p.Total-p.Done) / r * float64(time.Second))
}

// Summary is what a replay did. Processed = Inserted + Present + Resolved +
// Poison + Skipped.
type Summary struct {
	DryRun  bool   `json:"dry_run"`
	Subject string `json:"subject"`

	// The stream's window when the replay started: a range reaching before
	// StreamFirstSeq has lost its oldest events to retention.
	StreamFirstSeq  uint64    `json:"stream_first_seq"`
	StreamFirstTime time.Time `json:"stream_first_time"`
	StreamLastSeq   uint64    `json:"stream_last_seq"`

	FirstSeq  uint64 `json:"first_seq"` // first and last stream sequence handled
	LastSeq   uint64 `json:"last_seq"`
	Total     int64  `json:"total"` // messages in the range at the start (estimate)
	Processed int64  `json:"processed"`

	Inserted     int64 `json:"inserted"` // rows written (dry run: would be written)
	Present      int64 `json:"present"`  // token already had a row
	Resolved     int64 `json:"conflicts_resolved"`
	Deactivated  int64 `json:"deactivated"`
	Poison       int64 `json:"poison"`        // messages that can never be persisted
	DeadLettered int64 `json:"dead_lettered"` // of those, newly copied to the dead subject
	Skipped      int64 `json:"skipped"`       // not TokenIssued events (wildcard subject)

	Elapsed     time.Duration `json:"elapsed_ns"`
	Interrupted bool          `json:"interrupted"`
	// ResumeFrom, after an interruption or failure, is the --from-seq that
	// continues the replay without a gap. Replay is idempotent, so some
	// events after it may be seen again.
	ResumeFrom uint64 `json:"resume_from,omitempty"`
}

// Run replays the range o selects. It returns the summary even with an
// error; after ctx is cancelled the error wraps context.Canceled and the
// summary says where to resume.
func Run(ctx context.Context, w *Writer, o Options) (*Summary, error) {
	topo := w.Topology
	if o.Subject == "" {
		o.Subject = topo.IssuedFilter()
	}
	if err := o.validate(topo); err != nil {
		return nil, err
	}
	o.defaults()
	sum := &Summary{DryRun: o.DryRun, Subject: o.Subject}
	stream, err := w.JS.Stream(ctx, topo.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	sum.StreamFirstSeq, sum.StreamFirstTime, sum.StreamLastSeq = info.State.FirstSeq, info.State.FirstTime, info.State.LastSeq
	endSeq := info.State.LastSeq
	if o.ToSeq != 0 {
		endSeq = min(endSeq, o.ToSeq)
	}
	if endSeq == 0 || o.FromSeq > endSeq || (!o.Since.IsZero() && !o.Until.IsZero() && o.Since.After(o.Until)) {
		return sum, nil
	}

	rd, err := openReader(ctx, w.JS, topo.Stream, "replay", o.consumerConfig())
	if err != nil {
		return nil, err
	}
	total, err := o.total(ctx, w.JS, topo.Stream, rd.pending(), endSeq, info.State.LastSeq)
	if err != nil {
		return nil, errors.Join(err, rd.close(ctx))
	}
	sum.Total = total
	if rd.pending() == 0 {
		return sum, rd.close(ctx)
	}
	if err := rd.start(2 * o.BatchSize); err != nil {
		return nil, errors.Join(err, rd.close(ctx))
	}

	r := &runner{w: w, o: o, sum: sum, endSeq: endSeq, started: time.Now(), dead: &deadIndex{js: w.JS, topo: topo}}
	err = r.run(ctx, rd)
	err = errors.Join(err, rd.close(ctx))
	return sum, err
}

func (o *Options) validate(topo events.Topology) error {
	switch {
	case o.FromSeq != 0 && !o.Since.IsZero():
		return errors.New("give at most one start: a sequence or a time")
	case o.ToSeq != 0 && !o.Until.IsZero():
		return errors.New("give at most one end: a sequence or a time")
	case o.ToSeq != 0 && o.FromSeq > o.ToSeq:
		return fmt.Errorf("from-seq %d is after to-seq %d", o.FromSeq, o.ToSeq)
	case o.Workers < 0 || o.BatchSize < 0 || o.Linger < 0:
		return errors.New("workers, batch size and linger must not be negative")
	}
	s := o.Subject
	if s != topo.Prefix+".>" && !strings.HasPrefix(s, topo.Prefix+".") {
		return fmt.Errorf("subject %q is not in stream %s (subjects %s.>)", s, topo.Stream, topo.Prefix)
	}
	if !strings.ContainsAny(s, "*>") && !topo.IsIssuedSubject(s) && s != topo.ConflictSubject() {
		if s == topo.DeadSubject() {
			return fmt.Errorf("subject %q holds dead letters: use 'tokenpipe dlq replay'", s)
		}
		return fmt.Errorf("subject %q carries no TokenIssued events (use %s or %s)", s, topo.IssuedSubject(), topo.ConflictSubject())
	}
	return nil
}

func (o *Options) defaults() {
	if o.Workers == 0 {
		o.Workers = 2
	}
	if o.BatchSize == 0 {
		o.BatchSize = 1000
	}
	if o.Linger == 0 {
		o.Linger = 20 * time.Millisecond
	}
	if o.Finish == 0 {
		o.Finish = 30 * time.Second
	}
	if o.ProgressEvery == 0 {
		o.ProgressEvery = time.Second
	}
}

func (o *Options) consumerConfig() jetstream.OrderedConsumerConfig {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{o.Subject}, DeliverPolicy: jetstream.DeliverAllPolicy}
	switch {
	case o.FromSeq != 0:
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, o.FromSeq
	case !o.Since.IsZero():
		since := o.Since
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &since
	}
	return cfg
}

// total estimates the messages in the range: pending from the start minus
// pending after the end. It is only for progress and ETA.
func (o *Options) total(ctx context.Context, js jetstream.JetStream, stream string, fromStart, endSeq, lastSeq uint64) (int64, error) {
	after := jetstream.OrderedConsumerConfig{FilterSubjects: []string{o.Subject}}
	switch {
	case !o.Until.IsZero():
		until := o.Until.Add(time.Nanosecond)
		after.DeliverPolicy, after.OptStartTime = jetstream.DeliverByStartTimePolicy, &until
	case endSeq < lastSeq:
		after.DeliverPolicy, after.OptStartSeq = jetstream.DeliverByStartSequencePolicy, endSeq+1
	default:
		return int64(fromStart), nil
	}
	n, err := countFrom(ctx, js, stream, after)
	if err != nil {
		return 0, err
	}
	if n > fromStart {
		return 0, nil
	}
	return int64(fromStart - n), nil
}

// entry is one message read, with its stream sequence.
type entry struct {
	msg jetstream.Msg
	seq uint64
}

type batch []entry

// runner is one replay in progress. Its counters are guarded by mu; they are
// touched once per batch.
type runner struct {
	w       *Writer
	o       Options
	endSeq  uint64
	started time.Time
	dead    *deadIndex

	mu         sync.Mutex
	sum        *Summary
	lastSeq    uint64 // last sequence the reader took
	unfinished uint64 // lowest first sequence of a batch not completed, 0 if none
	failure    error
}

// run reads on the calling goroutine and writes on o.Workers goroutines.
func (r *runner) run(ctx context.Context, rd *reader) error {
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	// Batches in hand finish after an interruption, for at most Finish: a
	// half-replayed batch is harmless (replay is idempotent) but a finished
	// one shortens the next run.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	stopAfter := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(r.o.Finish, cancelWork)
		<-work.Done()
		t.Stop()
	})
	defer stopAfter()

	batches := make(chan batch, r.o.Workers)
	var wg sync.WaitGroup
	for range r.o.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				if runCtx.Err() != nil {
					r.markUnfinished(b)
					continue
				}
				if err := r.process(work, b); err != nil {
					r.markUnfinished(b)
					if ctx.Err() == nil {
						r.fail(err)
						cancelRun()
					}
				}
			}
		}()
	}
	stopProgress := r.reportProgress()
	readErr := r.read(runCtx, rd, batches) // closes batches
	wg.Wait()
	stopProgress()

	r.mu.Lock()
	defer r.mu.Unlock()
	r.sum.Elapsed = time.Since(r.started)
	switch {
	case r.failure != nil:
		r.sum.ResumeFrom = r.resumePoint()
		return r.failure
	case ctx.Err() != nil:
		r.sum.Interrupted = true
		r.sum.ResumeFrom = r.resumePoint()
		return fmt.Errorf("replay interrupted: %w", ctx.Err())
	case readErr != nil:
		r.sum.ResumeFrom = r.resumePoint()
		return readErr
	}
	return nil
}

// read takes messages until the end of the range and hands them out in
// batches: full ones, or what arrived within Linger of a batch's first
// message.
func (r *runner) read(ctx context.Context, rd *reader, out chan<- batch) error {
	defer close(out)
	var cur batch
	// wait bounds each Next: idleCheck while no batch is open, then Linger
	// from the batch's first message. One deadline per batch, not per message.
	var wait deadline
	defer wait.stop()
	wait.reset(ctx, idleCheck)
	send := func() error {
		b := cur
		cur = nil
		wait.reset(ctx, idleCheck)
		if len(b) == 0 {
			return nil
		}
		select {
		case out <- b:
			return nil
		case <-ctx.Done():
			r.markUnfinished(b)
			return ctx.Err()
		}
	}
	for {
		msg, err := rd.it.Next(jetstream.NextContext(wait.ctx))
		switch {
		case ctx.Err() != nil:
			r.markUnfinished(cur)
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded) && len(cur) > 0:
			if err := send(); err != nil {
				return err
			}
			continue
		case errors.Is(err, context.DeadlineExceeded):
			// Nothing for a while: pending messages may have aged out.
			done, err := rd.exhausted(ctx)
			if err != nil || done {
				return err
			}
			wait.reset(ctx, idleCheck)
			continue
		case err != nil:
			r.markUnfinished(cur)
			return fmt.Errorf("read stream: %w", err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			r.markUnfinished(cur)
			return fmt.Errorf("read stream: %w", err)
		}
		seq := meta.Sequence.Stream
		if seq > r.endSeq || (!r.o.Until.IsZero() && meta.Timestamp.After(r.o.Until)) {
			return send()
		}
		if len(cur) == 0 {
			wait.reset(ctx, r.o.Linger)
		}
		cur = append(cur, entry{msg: msg, seq: seq})
		r.mu.Lock()
		r.lastSeq = seq
		r.mu.Unlock()
		switch {
		case meta.NumPending == 0 || seq == r.endSeq:
			return send()
		case len(cur) >= r.o.BatchSize:
			if err := send(); err != nil {
				return err
			}
		}
	}
}

// deadline is a context with a timeout that can be restarted.
type deadline struct {
	ctx    context.Context
	cancel context.CancelFunc
}

func (d *deadline) reset(parent context.Context, after time.Duration) {
	d.stop()
	d.ctx, d.cancel = context.WithTimeout(parent, after)
}

func (d *deadline) stop() {
	if d.cancel != nil {
		d.cancel()
	}
}

// poisonMsg is a message that can never be persisted.
type poisonMsg struct {
	entry
	reason string
}

// process handles one batch: decode, write (or look up, in a dry run), and
// dead-letter what cannot be persisted.
func (r *runner) process(ctx context.Context, b batch) error {
	topo := r.w.Topology
	var (
		items    []Item
		from     []entry // from[i] carried items[i]
		poison   []poisonMsg
		skipped  int64
		dups     int64
		byDigest = map[events.Digest]int{}
	)
	for _, e := range b {
		var origin uint64
		switch subj := e.msg.Subject(); {
		case topo.IsIssuedSubject(subj):
			origin = e.seq
		case subj == topo.ConflictSubject():
			// A conflict is a copy; its header names the original event.
			s, err := strconv.ParseUint(e.msg.Headers().Get(events.HeaderOriginSeq), 10, 64)
			if err != nil || s == 0 {
				poison = append(poison, poisonMsg{e, "conflict event without a valid " + events.HeaderOriginSeq + " header"})
				continue
			}
			origin = s
		default:
			skipped++
			continue
		}
		ev, err := events.DecodeTokenIssued(e.msg.Data())
		if err != nil {
			poison = append(poison, poisonMsg{e, err.Error()})
			continue
		}
		// The same token twice (a copy published again): one row, at the
		// earliest sequence, as the persister does.
		if i, ok := byDigest[ev.TokenDigest]; ok {
			items[i].Seq = min(items[i].Seq, origin)
			dups++
			continue
		}
		byDigest[ev.TokenDigest] = len(items)
		items = append(items, Item{Event: ev, Seq: origin})
		from = append(from, e)
	}

	var res Result
	if r.o.DryRun {
		digests := make([]events.Digest, len(items))
		for i, it := range items {
			digests[i] = it.Event.TokenDigest
		}
		have, err := Existing(ctx, r.w.DB, digests)
		if err != nil {
			return err
		}
		res.Present = len(have)
		res.Inserted = len(items) - len(have)
	} else {
		var err error
		// A failed batch is not counted: it is marked unfinished and the
		// resume point covers it.
		if res, err = r.w.Write(ctx, items); err != nil {
			return err
		}
		for _, rej := range res.Rejected {
			e := from[byDigest[rej.Event.TokenDigest]]
			poison = append(poison, poisonMsg{e, "rejected by Postgres: " + rej.Err.Error()})
		}
	}
	var dead int64
	if !r.o.DryRun {
		for _, p := range poison {
			added, err := r.dead.add(ctx, p.msg.Subject(), p.seq, p.msg.Data(), p.reason)
			if err != nil {
				return err
			}
			if added {
				dead++
			}
		}
	}
	r.count(b, res, dups, skipped, int64(len(poison)), dead)
	return nil
}

// count adds a handled batch to the summary.
func (r *runner) count(b batch, res Result, dups, skipped, poison, dead int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.sum
	if len(b) > 0 {
		if s.FirstSeq == 0 || b[0].seq < s.FirstSeq {
			s.FirstSeq = b[0].seq
		}
		s.LastSeq = max(s.LastSeq, b[len(b)-1].seq)
	}
	s.Processed += int64(len(b))
	s.Inserted += int64(res.Inserted)
	s.Present += int64(res.Present) + dups
	s.Resolved += int64(res.Resolved)
	s.Deactivated += int64(res.Deactivated)
	s.Poison += poison
	s.DeadLettered += dead
	s.Skipped += skipped
}

func (r *runner) markUnfinished(b batch) {
	if len(b) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.unfinished == 0 || b[0].seq < r.unfinished {
		r.unfinished = b[0].seq
	}
}

func (r *runner) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.failure == nil {
		r.failure = err
	}
}

// resumePoint is the lowest sequence not known to be done. Caller holds mu.
func (r *runner) resumePoint() uint64 {
	if r.unfinished != 0 {
		return r.unfinished
	}
	if r.lastSeq == 0 {
		return max(r.o.FromSeq, 1)
	}
	return r.lastSeq + 1
}

// reportProgress calls o.Progress every ProgressEvery until the returned
// stop function is called, which also makes the final call.
func (r *runner) reportProgress() (stop func()) {
	if r.o.Progress == nil {
		return func() {}
	}
	snapshot := func(final bool) Progress {
		r.mu.Lock()
		defer r.mu.Unlock()
		return Progress{Done: r.sum.Processed, Total: r.sum.Total, LastSeq: r.sum.LastSeq, Elapsed: time.Since(r.started), Final: final}
	}
	done := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		t := time.NewTicker(r.o.ProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				r.o.Progress(snapshot(false))
			}
		}
	}()
	return func() {
		close(done)
		<-exited
		r.o.Progress(snapshot(true))
	}
}
