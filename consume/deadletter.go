package consume

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Settings are what every batch-consuming role (persister, recovery) needs.
type Settings struct {
	Pool     Config
	Retry    store.RetryPolicy
	Topology events.Topology
	// Finish bounds the last batch after a graceful stop begins.
	Finish time.Duration
	// NakDelay is how long JetStream waits before redelivering a batch that
	// could not be settled.
	NakDelay time.Duration
}

// DeadLetterOrNak dead-letters m, or, if even that fails, hands it back for a
// later delivery. It reports whether m was dead-lettered.
func (s Settings) DeadLetterOrNak(ctx context.Context, js jetstream.JetStream, log *slog.Logger, m jetstream.Msg, reason string) bool {
	if err := DeadLetter(ctx, js, s.Topology, m, reason); err != nil {
		log.Error("dead-letter failed; message left for redelivery", "err", err)
		_ = m.NakWithDelay(s.NakDelay)
		return false
	}
	log.Warn("message dead-lettered", "subject", m.Subject(), "reason", reason)
	return true
}

// DeadLetter copies m with its reason to the dead-letter subject and then
// terminates it, so it is never redelivered. The copy is published first: if
// that fails m is left for redelivery, never dropped. Message bodies hold
// digests only, so the copy carries no secret.
func DeadLetter(ctx context.Context, js jetstream.JetStream, topo events.Topology, m jetstream.Msg, reason string) error {
	var seq uint64
	if meta, err := m.Metadata(); err == nil {
		seq = meta.Sequence.Stream
	}
	if len(reason) > 512 {
		reason = reason[:512]
	}
	dl := nats.NewMsg(topo.DeadSubject())
	dl.Data = m.Data()
	dl.Header.Set(events.HeaderReason, reason)
	dl.Header.Set(events.HeaderOriginSubject, m.Subject())
	dl.Header.Set(events.HeaderOriginSeq, strconv.FormatUint(seq, 10))
	_, err := js.PublishMsg(ctx, dl,
		jetstream.WithMsgID(fmt.Sprintf("dead-%s-%d", m.Subject(), seq)),
		jetstream.WithExpectStream(topo.Stream))
	if err != nil {
		return fmt.Errorf("dead-letter seq %d: %w", seq, err)
	}
	// Plain Term, not TermWithReason: servers before 2.10 do not parse the
	// reason and would leave the message to redeliver. The reason travels in
	// the dead letter's header instead.
	if err := m.Term(); err != nil {
		return fmt.Errorf("terminate seq %d: %w", seq, err)
	}
	return nil
}
