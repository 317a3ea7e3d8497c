package app_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/audit"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
)

// rounds publishes rounds tokens for each of keys users, one round after
// the other, so a key's tokens are interleaved with every other key's. It
// returns every event and each user's newest.
func rounds(t *testing.T, p *pipetest.Pipeline, keys, rounds int) (all []*events.TokenIssued, newest map[string]*events.TokenIssued) {
	t.Helper()
	newest = map[string]*events.TokenIssued{}
	for range rounds {
		for k := range keys {
			ev := testenv.Token("app", fmt.Sprintf("user-%d", k), "read")
			testenv.Publish(t, p.JS, p.Topo, ev)
			all = append(all, ev)
			newest[ev.Subject] = ev
		}
	}
	return all, newest
}

// subjectsOfKeys reads every issued event in the stream and returns, per
// key, the subjects its events were published to.
func subjectsOfKeys(t *testing.T, p *pipetest.Pipeline, total int) map[string]map[string]bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cons, err := p.JS.OrderedConsumer(ctx, p.Topo.Stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{p.Topo.Prefix + ".issued.>"}})
	testenv.Must(t, err, "ordered consumer")
	out := map[string]map[string]bool{}
	for seen := 0; seen < total; {
		batch, err := cons.Fetch(total-seen, jetstream.FetchMaxWait(5*time.Second))
		testenv.Must(t, err, "fetch")
		n := 0
		for m := range batch.Messages() {
			ev, err := events.DecodeTokenIssued(m.Data())
			testenv.Must(t, err, "decode")
			if out[ev.Subject] == nil {
				out[ev.Subject] = map[string]bool{}
			}
			out[ev.Subject][m.Subject()] = true
			n++
		}
		if n == 0 {
			t.Fatalf("read %d of %d issued events", seen, total)
		}
		seen += n
	}
	return out
}

// handled sums what a persister did with the events it was given: every
// event is inserted, found existing, or forwarded to recovery.
func handled(t *testing.T, reg *prometheus.Registry) int {
	t.Helper()
	families, err := reg.Gather()
	testenv.Must(t, err, "gather")
	sum := 0.0
	for _, f := range families {
		switch f.GetName() {
		case "tokenpipe_persister_rows_persisted_total", "tokenpipe_persister_duplicates_total", "tokenpipe_persister_conflicts_forwarded_total":
			for _, m := range f.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return int(sum)
}

func auditClean(t *testing.T, p *pipetest.Pipeline, all []*events.TokenIssued) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := p.JS.Stream(ctx, p.Topo.Stream)
	testenv.Must(t, err, "stream")
	digests := make([]events.Digest, len(all))
	for i, ev := range all {
		digests[i] = ev.TokenDigest
	}
	r, err := audit.Check(ctx, p.Pool, digests, stream, append(p.Topo.PersisterConsumers(), p.Topo.Recovery)...)
	testenv.Must(t, err, "audit")
	if len(r.Missing)+len(r.Duplicated)+len(r.DoubleActive)+len(r.ActiveNotNewest) > 0 {
		t.Fatalf("audit: missing %d, duplicated %d, double ACTIVE %d, ACTIVE not newest %d",
			len(r.Missing), len(r.Duplicated), len(r.DoubleActive), len(r.ActiveNotNewest))
	}
	for name, n := range r.Pending {
		if n != 0 {
			t.Fatalf("consumer %s still has %d pending", name, n)
		}
	}
}

// TestPartitionedPersistersWriteDisjointKeys: with four partitions and two
// persisters bound to two each, every event of a key goes to one partition
// and is written by the persister bound to it, and the table ends as the
// unpartitioned pipeline leaves it.
func TestPartitionedPersistersWriteDisjointKeys(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Partition(t, 4)
	all, newest := rounds(t, p, 40, 4)

	byKey := subjectsOfKeys(t, p, len(all))
	if len(byKey) != 40 {
		t.Fatalf("events of %d keys in the partitions, want 40", len(byKey))
	}
	for key, subjects := range byKey {
		if len(subjects) != 1 {
			t.Fatalf("key %s was published to %v, want one partition", key, subjects)
		}
	}
	count := make([]int, 4)
	for i := range count {
		count[i] = int(p.SubjectCount(t, p.Topo.PartitionSubject(i)))
		if count[i] == 0 {
			t.Fatalf("partition %d is empty (counts %v)", i, count)
		}
	}

	regA, regB := prometheus.NewRegistry(), prometheus.NewRegistry()
	p.StartPersister(t, []int{0, 1}, regA)
	p.StartPersister(t, []int{2, 3}, regB)
	p.StartRecovery(t)
	p.Drained(t)

	if a, b := handled(t, regA), handled(t, regB); a != count[0]+count[1] || b != count[2]+count[3] {
		t.Fatalf("persister of 0,1 handled %d events and of 2,3 %d; partitions hold %v", a, b, count)
	}
	auditClean(t, p, all)
	states := p.States(t)
	for _, ev := range all {
		want := "INACTIVE"
		if newest[ev.Subject] == ev {
			want = "ACTIVE"
		}
		if got := states[ev.TokenDigest]; got != want {
			t.Fatalf("%s's token %s is %s, want %s", ev.Subject, ev.TokenDigest, got, want)
		}
	}
}

// TestTurningPartitioningOnDrainsEarlierEvents: events published before
// partitioning was turned on stay on the unpartitioned subject; only the
// persister bound to partition 0 reads it, and the newer, partitioned token
// of each key ends ACTIVE.
func TestTurningPartitioningOnDrainsEarlierEvents(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	before, _ := rounds(t, p, 20, 1)
	p.Partition(t, 4)
	after, newest := rounds(t, p, 20, 1)

	p.StartPersister(t, []int{1, 2, 3}, nil)
	p.StartRecovery(t)
	testenv.Eventually(t, 60*time.Second, "partitions 1-3 drained", func() (bool, error) {
		for part := 1; part < 4; part++ {
			if n, err := pending(p, p.Topo.PartitionConsumer(part)); err != nil || n > 0 {
				return false, err
			}
		}
		return true, nil
	})
	if n, err := pending(p, p.Topo.Persister); err != nil || n != uint64(len(before)) {
		t.Fatalf("unpartitioned consumer: %d pending (%v), want all %d earlier events: only partition 0's owner reads it", n, err, len(before))
	}
	p.StartPersister(t, []int{0}, nil)
	p.Drained(t)

	auditClean(t, p, append(before, after...))
	states := p.States(t)
	for _, ev := range newest {
		if states[ev.TokenDigest] != "ACTIVE" {
			t.Fatalf("%s's partitioned token is %s, want ACTIVE", ev.Subject, states[ev.TokenDigest])
		}
	}
}

func pending(p *pipetest.Pipeline, consumer string) (uint64, error) {
	c, err := p.JS.Consumer(context.Background(), p.Topo.Stream, consumer)
	if err != nil {
		return 0, err
	}
	info, err := c.Info(context.Background())
	if err != nil {
		return 0, err
	}
	return info.NumPending + uint64(info.NumAckPending), nil
}
