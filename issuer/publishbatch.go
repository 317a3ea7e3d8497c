package issuer

import (
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// publishBatch gathers the publishes of concurrent requests for a short
// window and hands them to the JetStream client in one tight loop, so they
// leave in one socket write (the client's flusher runs once the loop
// yields) and the server reads them, stores them and writes their acks in
// one pass. Without it, requests spread over time each cost a write and a
// wake-up on both sides: at 3,000 tokens/s the issuer's NATS flushes and the
// server's per-message reads and ack writes are a large part of both
// processes' CPU per token.
//
// No goroutine of its own: the first request of a window is its leader. It
// waits out the window, then publishes everyone's events, its own included,
// and each request goes on to wait for its own acknowledgement as before.
// The leader waits only while publishes come faster than one per window
// (the previous one started less than a window ago): at a low rate there is
// nothing to gather, and a request would pay the window for nothing.
type publishBatch struct {
	window time.Duration
	mu     sync.Mutex
	queue  []*pendingPublish
	last   time.Time // when the previous publish arrived
}

type pendingPublish struct {
	subject string
	body    []byte
	opts    []jetstream.PublishOpt
	future  jetstream.PubAckFuture
	err     error
	ready   chan struct{}
}

// publish returns the ack future of one event, published with the window's
// others. The leader's wait does not end early when its request is
// cancelled: the followers' events depend on it.
func (b *publishBatch) publish(js jetstream.JetStream, subject string, body []byte, opts ...jetstream.PublishOpt) (jetstream.PubAckFuture, error) {
	if b.window <= 0 {
		return js.PublishAsync(subject, body, opts...)
	}
	p := &pendingPublish{subject: subject, body: body, opts: opts, ready: make(chan struct{})}
	now := time.Now()
	b.mu.Lock()
	b.queue = append(b.queue, p)
	leader := len(b.queue) == 1
	busy := now.Sub(b.last) < b.window
	b.last = now
	b.mu.Unlock()
	if !leader {
		<-p.ready
		return p.future, p.err
	}
	if busy {
		time.Sleep(b.window)
	}
	b.mu.Lock()
	batch := b.queue
	b.queue = nil
	b.mu.Unlock()
	// Each request goes on as soon as its own publish is handed over. Once
	// one has waited out the stall wait (every in-flight slot taken for the
	// whole PublishTimeout), the rest fail at once instead of waiting their
	// turn for as long again.
	var stalled error
	for _, q := range batch {
		if stalled != nil {
			q.err = stalled
		} else {
			q.future, q.err = js.PublishAsync(q.subject, q.body, q.opts...)
			if errors.Is(q.err, jetstream.ErrTooManyStalledMsgs) {
				stalled = q.err
			}
		}
		close(q.ready)
	}
	return p.future, p.err
}
