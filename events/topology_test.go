package events_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
)

// TestProvisionIsSafeWhenManyPodsStartAtOnce races several provisioners,
// each with its own connection as separate pods would have.
func TestProvisionIsSafeWhenManyPodsStartAtOnce(t *testing.T) {
	t.Parallel()
	topo := testenv.Topology()
	var wg sync.WaitGroup
	errs := make(chan error, 6)
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc, err := nats.Connect(testenv.NATSURL())
			if err != nil {
				errs <- err
				return
			}
			defer nc.Close()
			js, _ := jetstream.New(nc)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err = events.Provision(ctx, js, topo)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("provision: %v", err)
		}
	}
	nc, err := nats.Connect(testenv.NATSURL())
	testenv.Must(t, err, "connect")
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx := context.Background()
	defer js.DeleteStream(ctx, topo.Stream)
	s, err := js.Stream(ctx, topo.Stream)
	testenv.Must(t, err, "stream")
	info, err := s.Info(ctx)
	testenv.Must(t, err, "info")
	if info.Config.Retention != jetstream.LimitsPolicy || info.Config.MaxAge != topo.MaxAge {
		t.Fatalf("stream config = %+v, want limits retention with max age %s", info.Config, topo.MaxAge)
	}
	for _, name := range []string{topo.Persister, topo.Recovery} {
		c, err := s.Consumer(ctx, name)
		testenv.Must(t, err, "consumer "+name)
		if c.CachedInfo().Config.AckPolicy != jetstream.AckExplicitPolicy {
			t.Fatalf("consumer %s is not ack-explicit", name)
		}
	}
}
