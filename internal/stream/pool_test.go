package stream_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/stream"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

func count(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	testenv.Must(t, c.Write(&m), "read counter")
	return m.GetCounter().GetValue()
}

func settler(t *testing.T, js jetstream.JetStream, topo events.Topology) *stream.Settler {
	return &stream.Settler{
		JS: js, Topology: topo, NakDelay: 50 * time.Millisecond, Log: testenv.Logger(t),
		Failures:     stream.NewFailures("test"),
		DeadLettered: prometheus.NewCounter(prometheus.CounterOpts{Name: "test_dead_lettered_total"}),
	}
}

// The pool carries out each verdict: ack and term settle for good, a nak
// comes back after its delay, a dead letter is copied with its reason and
// never redelivered.
func TestPoolSettlesEachVerdict(t *testing.T) {
	_, js, topo := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := map[uint64]string{} // stream sequence -> verdict on first delivery
	for _, v := range []string{"ack", "nak", "term", "dead"} {
		want[testenv.PublishRaw(t, js, topo.IssuedSubject(), []byte(v))] = v
	}
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(t, err, "open consumer")

	var mu sync.Mutex
	deliveries := map[string]int{}
	s := settler(t, js, topo)
	pool := &stream.Pool{
		Consumer: cons, Config: stream.Config{Workers: 2, BatchSize: 10, BatchWait: 10 * time.Millisecond},
		Finish: time.Second, InProgressEvery: time.Second, Settler: s, Log: testenv.Logger(t),
		Handler: func(_ context.Context, msgs []jetstream.Msg) []stream.Verdict {
			mu.Lock()
			defer mu.Unlock()
			out := make([]stream.Verdict, len(msgs))
			for i, m := range msgs {
				body := string(m.Data())
				deliveries[body]++
				switch {
				case body == "nak" && deliveries[body] == 1:
					out[i] = stream.Nak(100 * time.Millisecond)
				case body == "term":
					out[i] = stream.Term()
				case body == "dead":
					out[i] = stream.DeadLetter("poison for the test")
				default:
					out[i] = stream.Ack()
				}
			}
			return out
		},
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pool.Run(runCtx) }()
	testenv.Eventually(t, 20*time.Second, "every message settled", func() (bool, error) {
		info, err := cons.Info(ctx)
		if err != nil {
			return false, err
		}
		mu.Lock()
		defer mu.Unlock()
		return info.NumPending == 0 && info.NumAckPending == 0 && deliveries["nak"] == 2, nil
	})
	stop()
	testenv.Must(t, <-done, "pool run")

	mu.Lock()
	defer mu.Unlock()
	for body, n := range deliveries {
		if wantN := map[string]int{"nak": 2}[body]; (wantN == 0 && n != 1) || (wantN != 0 && n != wantN) {
			t.Errorf("%s delivered %d times", body, n)
		}
	}
	if got := count(t, s.DeadLettered); got != 1 {
		t.Errorf("dead lettered = %v, want 1", got)
	}
	st, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "open stream")
	dead, err := st.GetLastMsgForSubject(ctx, topo.DeadSubject())
	testenv.Must(t, err, "read dead letter")
	if string(dead.Data) != "dead" || dead.Header.Get(events.HeaderReason) != "poison for the test" {
		t.Errorf("dead letter = %q reason %q", dead.Data, dead.Header.Get(events.HeaderReason))
	}
	for _, op := range []string{"ack", "nak", "term", "in_progress", "dead_letter"} {
		if got := count(t, s.Failures.WithLabelValues(op)); got != 0 {
			t.Errorf("%s failures = %v, want 0", op, got)
		}
	}
}

// An acknowledgement that fails is counted, not dropped; a message the
// handler gave no verdict goes back for redelivery, never acked.
func TestSettleCountsFailuresAndNaksUnsettled(t *testing.T) {
	_, js, topo := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	testenv.PublishRaw(t, js, topo.IssuedSubject(), []byte("one"))
	testenv.PublishRaw(t, js, topo.IssuedSubject(), []byte("two"))
	cons, err := js.Consumer(ctx, topo.Stream, topo.Persister)
	testenv.Must(t, err, "open consumer")
	batch, err := cons.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch")
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != 2 {
		t.Fatalf("fetched %d messages, want 2", len(msgs))
	}
	// Acked behind the pool's back: the pool's own ack then fails.
	testenv.Must(t, msgs[0].Ack(), "first ack")
	s := settler(t, js, topo)
	s.Settle(ctx, msgs, []stream.Verdict{stream.Ack()}) // no verdict for the second
	if got := count(t, s.Failures.WithLabelValues("ack")); got != 1 {
		t.Errorf("ack failures = %v, want 1", got)
	}
	again, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	testenv.Must(t, err, "fetch again")
	m, ok := <-again.Messages()
	if !ok {
		t.Fatalf("the message without a verdict was not redelivered: %v", again.Error())
	}
	if string(m.Data()) != "two" {
		t.Errorf("redelivered %q, want the message without a verdict", m.Data())
	}
	testenv.Must(t, m.Ack(), "ack redelivery")
}
