package stream

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
)

type verdictKind int

const (
	unset verdictKind = iota
	ack
	nak
	term
	deadLetter
)

// Verdict is what a handler decided for one message.
type Verdict struct {
	kind   verdictKind
	delay  time.Duration
	reason string
}

// Ack: the message's work is committed.
func Ack() Verdict { return Verdict{kind: ack} }

// Nak: hand the message back for redelivery after delay; nothing of it was
// committed.
func Nak(delay time.Duration) Verdict { return Verdict{kind: nak, delay: delay} }

// Term: never redeliver the message, and keep no copy.
func Term() Verdict { return Verdict{kind: term} }

// DeadLetter: the message can never be processed (poison); copy it with the
// reason to the dead-letter subject, then terminate it.
func DeadLetter(reason string) Verdict { return Verdict{kind: deadLetter, reason: reason} }

func (v Verdict) String() string {
	switch v.kind {
	case ack:
		return "ack"
	case nak:
		return "nak(" + v.delay.String() + ")"
	case term:
		return "term"
	case deadLetter:
		return "dead-letter(" + v.reason + ")"
	}
	return "unset"
}

// Settler settles messages by their verdicts.
type Settler struct {
	JS       jetstream.JetStream
	Topology events.Topology
	// NakDelay is the redelivery delay of a message whose verdict could not
	// be carried out (its dead letter failed, or the handler gave none).
	NakDelay time.Duration
	Log      *slog.Logger
	// Failures counts acknowledgements the server may not have received, by
	// operation (ack, nak, term, in_progress, dead_letter). May be nil.
	Failures *prometheus.CounterVec
	// DeadLettered counts messages moved to the dead-letter subject. May be nil.
	DeadLettered prometheus.Counter
}

// Settle carries out one verdict per message. A message the handler gave no
// verdict is handed back for redelivery: nothing is ever acked by default.
func (s *Settler) Settle(ctx context.Context, msgs []jetstream.Msg, verdicts []Verdict) {
	if len(verdicts) != len(msgs) {
		s.Log.Error("handler returned the wrong number of verdicts; unsettled messages go back for redelivery",
			"messages", len(msgs), "verdicts", len(verdicts))
	}
	for i, m := range msgs {
		v := Verdict{}
		if i < len(verdicts) {
			v = verdicts[i]
		}
		s.settle(ctx, m, v)
	}
}

func (s *Settler) settle(ctx context.Context, m jetstream.Msg, v Verdict) {
	switch v.kind {
	case ack:
		s.check("ack", m, m.Ack())
	case nak:
		s.check("nak", m, m.NakWithDelay(v.delay))
	case term:
		s.check("term", m, m.Term())
	case deadLetter:
		s.deadLetter(ctx, m, v.reason)
	default:
		s.Log.Error("message without a verdict; returning it for redelivery", "subject", m.Subject())
		s.check("nak", m, m.NakWithDelay(s.NakDelay))
	}
}

// deadLetter is the one path of poison: copy m to the dead subject, then
// terminate it so it is never redelivered. The copy is published first: if
// that fails m is handed back for a later delivery, never dropped.
func (s *Settler) deadLetter(ctx context.Context, m jetstream.Msg, reason string) {
	var seq uint64
	if meta, err := m.Metadata(); err == nil {
		seq = meta.Sequence.Stream
	}
	if _, err := PublishDeadLetter(ctx, s.JS, s.Topology, m.Subject(), seq, m.Data(), reason); err != nil {
		s.check("dead_letter", m, err)
		s.check("nak", m, m.NakWithDelay(s.NakDelay))
		return
	}
	// Plain Term, not TermWithReason: servers before 2.10 do not parse the
	// reason and would leave the message to redeliver. The reason travels in
	// the dead letter's header instead.
	if err := m.Term(); err != nil {
		s.check("term", m, err)
		s.check("nak", m, m.NakWithDelay(s.NakDelay))
		return
	}
	s.Log.Warn("message dead-lettered", "subject", m.Subject(), "reason", reason)
	if s.DeadLettered != nil {
		s.DeadLettered.Inc()
	}
}

// check counts and logs a failed acknowledgement. The message is then
// redelivered after its ack wait (an ack or term lost), or earlier than
// asked (a nak lost): the writers are idempotent, so either costs time only.
func (s *Settler) check(op string, m jetstream.Msg, err error) {
	if err == nil {
		return
	}
	if s.Failures != nil {
		s.Failures.WithLabelValues(op).Inc()
	}
	var seq uint64
	if meta, merr := m.Metadata(); merr == nil {
		seq = meta.Sequence.Stream
	}
	s.Log.Warn("settling a message failed; it will be redelivered", "op", op, "err", err, "subject", m.Subject(), "stream_seq", seq)
}

// keepInProgress tells JetStream every interval that msgs are still being
// worked on. Call the returned stop function before settling them.
func (s *Settler) keepInProgress(msgs []jetstream.Msg, interval time.Duration) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				for _, m := range msgs {
					s.check("in_progress", m, m.InProgress())
				}
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
	}
}

// NewFailures returns the counter of failed acknowledgements for a role,
// named tokenpipe_<role>_settle_failures_total; register it with the role's
// other series.
func NewFailures(role string) *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tokenpipe_" + role + "_settle_failures_total",
		Help: "Message acknowledgements (ack, nak, term, in_progress, dead_letter) that failed; the message is redelivered.",
	}, []string{"op"})
}

// PublishDeadLetter copies a message (its subject, stream sequence and body)
// with its reason to the dead subject. The message id is derived from the
// origin, so a repeated copy within the duplicate window is dropped; it
// reports whether JetStream stored a new message. Message bodies hold
// digests only, so the copy carries no secret.
func PublishDeadLetter(ctx context.Context, js jetstream.JetStream, topo events.Topology, subject string, seq uint64, data []byte, reason string) (bool, error) {
	if len(reason) > 512 {
		reason = reason[:512]
	}
	dl := nats.NewMsg(topo.DeadSubject())
	dl.Data = data
	dl.Header.Set(events.HeaderReason, reason)
	dl.Header.Set(events.HeaderOriginSubject, subject)
	dl.Header.Set(events.HeaderOriginSeq, strconv.FormatUint(seq, 10))
	ack, err := js.PublishMsg(ctx, dl,
		jetstream.WithMsgID(fmt.Sprintf("dead-%s-%d", subject, seq)),
		jetstream.WithExpectStream(topo.Stream))
	if err != nil {
		return false, fmt.Errorf("dead-letter seq %d: %w", seq, err)
	}
	return !ack.Duplicate, nil
}
