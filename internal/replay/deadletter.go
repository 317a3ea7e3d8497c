package replay

import (
	"context"
	"fmt"
	"strconv"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/stream"
)

// PublishDeadLetter copies a message to the dead subject with the headers
// and message id the pool's dead-letter path gives it, but does not
// terminate anything: a replay's messages come from its own consumer and
// need no ack. It reports whether JetStream stored a new message (false: a
// duplicate within the deduplication window).
func PublishDeadLetter(ctx context.Context, js jetstream.JetStream, topo events.Topology, subject string, seq uint64, data []byte, reason string) (bool, error) {
	return stream.PublishDeadLetter(ctx, js, topo, subject, seq, data, reason)
}

// origin names the message a dead letter was copied from.
type origin struct {
	subject string
	seq     uint64
}

// deadIndex knows which messages already have a dead letter. The message id
// only deduplicates within the stream's duplicate window (minutes), while a
// replay may run again days later; the index makes a repeated replay add no
// second copy. It is loaded on the first poison message, so a clean range
// costs nothing.
type deadIndex struct {
	js   jetstream.JetStream
	topo events.Topology

	mu    sync.Mutex // held across publish: poison is rare, order is simple
	known map[origin]bool
}

// add dead-letters the message unless it already has a dead letter, and
// reports whether it added one.
func (d *deadIndex) add(ctx context.Context, subject string, seq uint64, data []byte, reason string) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.known == nil {
		known, err := deadOrigins(ctx, d.js, d.topo)
		if err != nil {
			return false, err
		}
		d.known = known
	}
	o := origin{subject, seq}
	if d.known[o] {
		return false, nil
	}
	added, err := PublishDeadLetter(ctx, d.js, d.topo, subject, seq, data, reason)
	if err != nil {
		return false, err
	}
	d.known[o] = true
	return added, nil
}

// deadOrigins reads the headers of every dead letter and returns the
// messages they were copied from.
func deadOrigins(ctx context.Context, js jetstream.JetStream, topo events.Topology) (map[origin]bool, error) {
	known := map[origin]bool{}
	err := Scan(ctx, js, topo.Stream, topo.DeadSubject(), 1, true, func(m jetstream.Msg) error {
		h := m.Headers()
		seq, err := strconv.ParseUint(h.Get(events.HeaderOriginSeq), 10, 64)
		if err == nil {
			known[origin{h.Get(events.HeaderOriginSubject), seq}] = true
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read dead letters: %w", err)
	}
	return known, nil
}
