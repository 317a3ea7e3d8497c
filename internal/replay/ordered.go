package replay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ToolPrefix starts the name of every ephemeral consumer the operator tools
// create, so status can tell them from the durables and cleanup can find
// every one of them, including those an ordered consumer replaced after a
// reset.
const ToolPrefix = "tokenpipe-tool-"

// inactiveThreshold lets the server remove a tool's consumer if the process
// dies without cleaning up. A live reader is never idle this long: it keeps a
// pull request open, and if a long database retry stalls it past this, the
// ordered consumer recreates itself from where it was.
const inactiveThreshold = time.Minute

// idleCheck is how long a reader waits for a message before it asks the
// server whether anything is left to read (messages counted as pending may
// vanish: aged out or purged).
const idleCheck = 2 * time.Second

// reader is an ordered consumer over one subject of the stream. It is never
// one of the durable consumers: acks are not needed and production offsets
// are not touched.
type reader struct {
	js     jetstream.JetStream
	stream string
	prefix string
	cons   jetstream.Consumer
	it     jetstream.MessagesContext
}

// openReader creates the ordered consumer. The caller must call close, which
// also runs if creation fails halfway.
func openReader(ctx context.Context, js jetstream.JetStream, stream, role string, cfg jetstream.OrderedConsumerConfig) (*reader, error) {
	r := &reader{js: js, stream: stream, prefix: ToolPrefix + role + "-" + randomID()}
	cfg.NamePrefix = r.prefix
	cfg.InactiveThreshold = inactiveThreshold
	cons, err := js.OrderedConsumer(ctx, stream, cfg)
	if err != nil {
		_ = r.close(ctx)
		return nil, fmt.Errorf("create ordered consumer on %s: %w", stream, err)
	}
	r.cons = cons
	return r, nil
}

// pending is how many matching messages the stream held from the start
// position when the consumer was created.
func (r *reader) pending() uint64 {
	if info := r.cons.CachedInfo(); info != nil {
		return info.NumPending
	}
	return 0
}

// start begins delivery; buffer bounds the messages held in the client.
func (r *reader) start(buffer int) error {
	it, err := r.cons.Messages(jetstream.PullMaxMessages(buffer))
	if err != nil {
		return fmt.Errorf("read %s: %w", r.stream, err)
	}
	r.it = it
	return nil
}

// exhausted asks the server whether the consumer has anything left.
func (r *reader) exhausted(ctx context.Context) (bool, error) {
	info, err := r.cons.Info(ctx)
	if err != nil {
		return false, fmt.Errorf("consumer info: %w", err)
	}
	return info.NumPending == 0, nil
}

// close stops delivery and deletes every consumer this reader created. The
// library deletes a replaced consumer in the background and nobody deletes
// the last one, so close looks them up by name rather than trusting either.
func (r *reader) close(ctx context.Context) error {
	if r.it != nil {
		r.it.Stop()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	stream, err := r.js.Stream(ctx, r.stream)
	if err != nil {
		return fmt.Errorf("clean up consumers of %s: %w", r.stream, err)
	}
	names := stream.ConsumerNames(ctx)
	var mine []string
	for name := range names.Name() {
		if strings.HasPrefix(name, r.prefix) {
			mine = append(mine, name)
		}
	}
	if err := names.Err(); err != nil {
		return fmt.Errorf("clean up consumers of %s: %w", r.stream, err)
	}
	var errs []error
	for _, name := range mine {
		if err := stream.DeleteConsumer(ctx, name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			errs = append(errs, fmt.Errorf("delete consumer %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// Scan calls fn for every message on subject from sequence start (1 for the
// beginning) up to the end of the stream as Scan finds it, in stream order,
// through an ordered consumer it removes before returning. headersOnly skips
// bodies when only headers are needed.
func Scan(ctx context.Context, js jetstream.JetStream, stream, subject string, start uint64, headersOnly bool, fn func(jetstream.Msg) error) (err error) {
	cfg := jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subject},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    max(start, 1),
		HeadersOnly:    headersOnly,
	}
	rd, err := openReader(ctx, js, stream, "scan", cfg)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, rd.close(ctx)) }()
	if rd.pending() == 0 {
		return nil
	}
	if err := rd.start(256); err != nil {
		return err
	}
	for {
		wait, cancel := context.WithTimeout(ctx, idleCheck)
		msg, err := rd.it.Next(jetstream.NextContext(wait))
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded):
			if done, err := rd.exhausted(ctx); err != nil || done {
				return err
			}
			continue
		case err != nil:
			return fmt.Errorf("scan %s: %w", subject, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("scan %s: %w", subject, err)
		}
		if err := fn(msg); err != nil {
			return err
		}
		if meta.NumPending == 0 {
			return nil
		}
	}
}

// countFrom returns how many messages on subject the stream holds from a
// start position on, by asking a short-lived consumer for its pending count.
func countFrom(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.OrderedConsumerConfig) (n uint64, err error) {
	rd, err := openReader(ctx, js, stream, "count", cfg)
	if err != nil {
		return 0, err
	}
	defer func() { err = errors.Join(err, rd.close(ctx)) }()
	return rd.pending(), nil
}

func randomID() string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
