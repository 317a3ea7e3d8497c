package consume

import (
	"context"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
)

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
