package issuer

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// Concurrent publishes gathered in windows each get their own
// acknowledgement, with a distinct stream sequence, and every event is in
// the stream once; a publish refused by the client (here: to a subject the
// stream does not take, with an expected stream) fails alone.
func TestPublishBatchGivesEachEventItsOwnAck(t *testing.T) {
	t.Parallel()
	_, js, topo := testenv.JetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b := &publishBatch{window: 5 * time.Millisecond}
	const n = 200
	seqs := make([]uint64, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i%20) * time.Millisecond) // several windows
			f, err := b.publish(js, topo.IssuedSubject(), fmt.Appendf(nil, "e%d", i),
				jetstream.WithMsgID(fmt.Sprintf("id-%d", i)), jetstream.WithExpectStream(topo.Stream))
			if err != nil {
				errs <- err
				return
			}
			select {
			case ack := <-f.Ok():
				seqs[i] = ack.Sequence
			case err := <-f.Err():
				errs <- err
			case <-ctx.Done():
				errs <- ctx.Err()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("publish: %v", err)
	}
	seen := map[uint64]bool{}
	for i, s := range seqs {
		if s == 0 || seen[s] {
			t.Fatalf("event %d: sequence %d (zero or shared)", i, s)
		}
		seen[s] = true
	}
	st, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := st.Info(ctx)
	testenv.Must(t, err, "stream info")
	if info.State.Msgs != n {
		t.Fatalf("stream holds %d messages, want %d", info.State.Msgs, n)
	}

	// A publish that fails at the server fails for its own request only.
	f, err := b.publish(js, topo.IssuedSubject(), []byte("x"), jetstream.WithExpectStream("NOT_"+topo.Stream))
	testenv.Must(t, err, "publish")
	select {
	case <-f.Ok():
		t.Fatal("a publish expecting another stream was acknowledged")
	case <-f.Err():
	case <-ctx.Done():
		t.Fatal("no answer")
	}
}

// At a low rate a publish does not wait for a window: nothing would join it.
func TestPublishBatchDoesNotDelayALonePublish(t *testing.T) {
	t.Parallel()
	_, js, topo := testenv.JetStream(t)
	b := &publishBatch{window: 300 * time.Millisecond}
	for i := range 3 {
		start := time.Now()
		f, err := b.publish(js, topo.IssuedSubject(), []byte("alone"))
		testenv.Must(t, err, "publish")
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatalf("publish: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no ack")
		}
		if took := time.Since(start); took >= 300*time.Millisecond {
			t.Fatalf("publish %d after a quiet spell took %v: it waited for a window", i, took)
		}
		time.Sleep(400 * time.Millisecond) // longer than the window: quiet again
	}
}
