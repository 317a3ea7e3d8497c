package events_test

import (
	"context"
	"fmt"
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

// TestPartitionIsFixedPerKey: issuers agree on a key's partition without
// coordination, and the function must never change silently, or a rolling
// upgrade would send one key's events to two partitions at once.
func TestPartitionIsFixedPerKey(t *testing.T) {
	t.Parallel()
	cases := []struct {
		client, subject, scope string
		of4, of16              int
	}{
		{"app", "alice", "read", 0, 0},
		{"app", "bob", "read write", 2, 10},
		{"mobile", "carol", "profile", 3, 11},
	}
	for _, c := range cases {
		if got := events.Partition(c.client, c.subject, c.scope, 4); got != c.of4 {
			t.Errorf("Partition(%q, %q, %q, 4) = %d, want %d", c.client, c.subject, c.scope, got, c.of4)
		}
		if got := events.Partition(c.client, c.subject, c.scope, 16); got != c.of16 {
			t.Errorf("Partition(%q, %q, %q, 16) = %d, want %d", c.client, c.subject, c.scope, got, c.of16)
		}
	}
	// The separator keeps fields apart: ("ab", "c") is not ("a", "bc").
	a, b := events.Partition("ab", "c", "s", 1<<20), events.Partition("a", "bc", "s", 1<<20)
	if a == b {
		t.Errorf("keys that differ only in where a field ends share partition %d of 2^20", a)
	}
}

func TestPartitionSpreadsKeys(t *testing.T) {
	t.Parallel()
	const n, keys = 4, 20000
	counts := make([]int, n)
	for i := range keys {
		counts[events.Partition("app", fmt.Sprintf("user-%d", i), "read", n)]++
	}
	for p, c := range counts {
		if c < keys/n*9/10 || c > keys/n*11/10 {
			t.Errorf("partition %d holds %d of %d keys, want within 10%% of %d (all: %v)", p, c, keys, keys/n, counts)
		}
	}
}

func TestPartitionedSubjectsAndConsumers(t *testing.T) {
	t.Parallel()
	topo := testenv.Topology()
	one := topo
	one.Partitions = 1
	if got := one.IssuedSubjectOf("app", "alice", "read"); got != topo.Prefix+".issued" {
		t.Errorf("one partition publishes to %q, want the unpartitioned %q", got, topo.Prefix+".issued")
	}
	if got := one.PersisterConsumers(); len(got) != 1 || got[0] != topo.Persister {
		t.Errorf("one partition: consumers %v, want only %q", got, topo.Persister)
	}
	four := topo
	four.Partitions = 4
	if got, want := four.IssuedSubjectOf("app", "bob", "read write"), topo.Prefix+".issued.2"; got != want {
		t.Errorf("subject = %q, want %q", got, want)
	}
	if got := four.PersisterConsumers(); len(got) != 5 || got[0] != topo.Persister || got[4] != topo.Persister+"-p3" {
		t.Errorf("consumers = %v, want the unpartitioned one and p0..p3", got)
	}
	if got := four.PartitionConsumerConfig(3).FilterSubject; got != topo.Prefix+".issued.3" {
		t.Errorf("partition 3 filters %q", got)
	}
	if got := four.ForPartition(1).Persister; got != topo.Persister+"-p1" {
		t.Errorf("partition 1's persister consumer = %q", got)
	}
	for s, want := range map[string]bool{
		topo.Prefix + ".issued": true, topo.Prefix + ".issued.0": true, topo.Prefix + ".issued.17": true,
		topo.Prefix + ".issued.017": false, topo.Prefix + ".issued.-1": false, topo.Prefix + ".issued.x": false,
		topo.Prefix + ".issued.1.2": false, topo.Prefix + ".conflict": false, topo.Prefix + ".issuedx": false,
	} {
		if got := four.IsIssuedSubject(s); got != want {
			t.Errorf("IsIssuedSubject(%q) = %v, want %v", s, got, want)
		}
	}
	bad := topo
	bad.Partitions = events.MaxPartitions + 1
	if bad.Validate() == nil {
		t.Error("a topology with too many partitions validated")
	}
}
