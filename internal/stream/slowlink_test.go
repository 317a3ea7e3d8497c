package stream_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/stream"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// slowLink is a TCP proxy to NATS that delivers everything the server sends
// a fixed delay late, in order, as a client starved of CPU on a busy machine
// sees it: the bytes arrive, but the client reads them late.
type slowLink struct {
	ln    net.Listener
	delay time.Duration
	wg    sync.WaitGroup
}

func newSlowLink(t *testing.T, server string, delay time.Duration) *slowLink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	testenv.Must(t, err, "listen")
	l := &slowLink{ln: ln, delay: delay}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", server)
			if err != nil {
				c.Close()
				continue
			}
			l.wg.Add(2)
			go func() { defer l.wg.Done(); _, _ = io.Copy(s, c); s.Close() }()
			go func() { defer l.wg.Done(); l.late(c, s); c.Close() }()
		}
	}()
	t.Cleanup(func() { ln.Close(); l.wg.Wait() })
	return l
}

// late copies src to dst, each chunk delay after it was read.
func (l *slowLink) late(dst, src net.Conn) {
	type chunk struct {
		at   time.Time
		data []byte
	}
	q := make(chan chunk, 4096)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 32*1024)
			n, err := src.Read(buf)
			if n > 0 {
				q <- chunk{time.Now(), buf[:n]}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range q {
		time.Sleep(time.Until(c.at.Add(l.delay)))
		if _, err := dst.Write(c.data); err != nil {
			src.Close()
			for range q {
			}
			return
		}
	}
}

func (l *slowLink) url() string { return "nats://" + l.ln.Addr().String() }

// A worker whose pulls are answered late (a starved process on a busy
// machine) must still take every message the server delivered to it: a
// graceful stop leaves nothing delivered but unacknowledged, waiting for
// the ack timeout.
//
// It failed with the client's FetchNoWait, which gives up one second after
// its last message (a client-side timer in nats.go), so a batch the server
// sent later went to an inbox nobody read and stayed ack pending until the
// ack wait, then was redelivered into the same trap: with answers 1.5 s
// late the pool handled 6 of 400 messages in 40 s, 394 ack pending; a
// persister on a machine with a load average of 50 showed the same as "100
// ack pending" after a graceful stop. The pool's own pull requests answer
// into an inbox that lives as long as the worker (pull.go).
func TestLateAnswersLeaveNothingInFlight(t *testing.T) {
	t.Parallel()
	_, js, topo := testenv.JetStream(t)
	for range 400 {
		testenv.Publish(t, js, topo, testenv.Token("app", testenv.Name("user-"), "read"))
	}
	link := newSlowLink(t, strings.TrimPrefix(testenv.NATSURL(), "nats://"), 1500*time.Millisecond)
	nc, err := nats.Connect(link.url(), nats.Timeout(10*time.Second))
	testenv.Must(t, err, "connect through the slow link")
	defer nc.Close()
	slowJS, err := jetstream.New(nc, jetstream.WithDefaultTimeout(30*time.Second))
	testenv.Must(t, err, "jetstream")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cons, err := slowJS.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(t, err, "consumer")

	var handled atomic.Int64
	pool := &stream.Pool{
		Consumer: cons, Config: stream.Config{Workers: 1, BatchSize: 50, BatchWait: 10 * time.Millisecond},
		Finish: 30 * time.Second, Settler: settler(t, slowJS, topo), Log: testenv.Logger(t),
		Handler: func(_ context.Context, msgs []jetstream.Msg) []stream.Verdict {
			handled.Add(int64(len(msgs)))
			v := make([]stream.Verdict, len(msgs))
			for i := range v {
				v[i] = stream.Ack()
			}
			return v
		},
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pool.Run(runCtx) }()
	direct, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(t, err, "consumer")
	testenv.Eventually(t, 2*time.Minute, "100 messages handled", func() (bool, error) {
		info, err := direct.Info(ctx)
		if err != nil {
			return false, err
		}
		if handled.Load() >= 100 {
			return true, nil
		}
		return false, fmt.Errorf("delivered %d, acked up to %d, %d ack pending, %d handled",
			info.Delivered.Consumer, info.AckFloor.Consumer, info.NumAckPending, handled.Load())
	})
	stop()
	testenv.Must(t, <-done, "run")
	testenv.Must(t, nc.FlushTimeout(30*time.Second), "flush")

	testenv.Eventually(t, 10*time.Second, "acks processed", func() (bool, error) {
		info, err := direct.Info(ctx)
		if err != nil {
			return false, err
		}
		if info.AckFloor.Consumer == info.Delivered.Consumer {
			return true, nil
		}
		return false, fmt.Errorf("delivered %d, acked up to %d, %d ack pending, %d handled",
			info.Delivered.Consumer, info.AckFloor.Consumer, info.NumAckPending, handled.Load())
	})
}

// Answers later than a worker waits for them (answerWait, 5 s: a stalled
// server or link) are taken by a later fetch of the pool, whichever worker
// makes it: with three workers taking turns and every answer 6 s late, each
// message is handled once, inside the consumer's 12 s ack wait, and none is
// redelivered. (An inbox per worker, which the pool had before its workers
// shared one, also passes here: its late answers waited for their own
// worker's turn, up to one answer wait per other worker, which acks raced
// ahead of in this setup; with many workers that wait can pass the ack
// wait.)
func TestLateAnswersAreTakenByTheNextFetchOfAnyWorker(t *testing.T) {
	t.Parallel()
	_, js, topo := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const n, ackWait = 100, 12 * time.Second
	direct, err := js.CreateOrUpdateConsumer(ctx, topo.Stream, jetstream.ConsumerConfig{
		Durable: "late-" + topo.Persister, AckPolicy: jetstream.AckExplicitPolicy, AckWait: ackWait,
		FilterSubject: topo.IssuedSubject(),
	})
	testenv.Must(t, err, "consumer with a short ack wait")
	for i := range n {
		testenv.PublishRaw(t, js, topo.IssuedSubject(), fmt.Appendf(nil, "m%d", i))
	}
	link := newSlowLink(t, strings.TrimPrefix(testenv.NATSURL(), "nats://"), 6*time.Second)
	nc, err := nats.Connect(link.url(), nats.Timeout(20*time.Second))
	testenv.Must(t, err, "connect through the slow link")
	defer nc.Close()
	slowJS, err := jetstream.New(nc, jetstream.WithDefaultTimeout(30*time.Second))
	testenv.Must(t, err, "jetstream")
	cons, err := slowJS.Consumer(ctx, topo.Stream, direct.CachedInfo().Name)
	testenv.Must(t, err, "consumer through the slow link")

	var mu sync.Mutex
	handled := map[string]int{}
	pool := &stream.Pool{
		Consumer: cons, Config: stream.Config{Workers: 3, BatchSize: 50, BatchWait: 10 * time.Millisecond, IdleWait: 30 * time.Second},
		Finish: 30 * time.Second, Settler: settler(t, slowJS, topo), Log: testenv.Logger(t),
		Handler: func(_ context.Context, msgs []jetstream.Msg) []stream.Verdict {
			mu.Lock()
			defer mu.Unlock()
			v := make([]stream.Verdict, len(msgs))
			for i, m := range msgs {
				handled[string(m.Data())]++
				v[i] = stream.Ack()
			}
			return v
		},
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pool.Run(runCtx) }()
	testenv.Eventually(t, 2*time.Minute, "every message handled", func() (bool, error) {
		mu.Lock()
		defer mu.Unlock()
		return len(handled) == n, nil
	})
	stop()
	testenv.Must(t, <-done, "run")
	info, err := direct.Info(ctx)
	testenv.Must(t, err, "consumer info")
	mu.Lock()
	defer mu.Unlock()
	twice := 0
	for _, k := range handled {
		if k > 1 {
			twice++
		}
	}
	if info.NumRedelivered > 0 || twice > 0 {
		t.Errorf("%d messages redelivered after the %v ack wait, %d handled twice; want none", info.NumRedelivered, ackWait, twice)
	}
}
