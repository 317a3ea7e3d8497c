package status_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/replay"
	"github.com/tokenpipe/tokenpipe/internal/status"
	"github.com/tokenpipe/tokenpipe/internal/testenv"
	"github.com/tokenpipe/tokenpipe/internal/testenv/pipetest"
)

func gather(t *testing.T, p *pipetest.Pipeline) (*status.Report, map[string]status.Consumer) {
	t.Helper()
	r, err := status.Gather(context.Background(), p.JS, p.Pool, p.Topo)
	testenv.Must(t, err, "gather")
	byName := map[string]status.Consumer{}
	for _, c := range r.Consumers {
		byName[c.Name] = c
	}
	return r, byName
}

func TestStatusReportsPendingAckPendingAndLag(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	var items []replay.Item
	for range 10 {
		ev := testenv.Token("app", testenv.Name("u-"), "read")
		items = append(items, replay.Item{Event: ev, Seq: testenv.Publish(t, p.JS, p.Topo, ev)})
	}
	// Rows for three tokens, one of them revoked.
	_, err := p.Writer(t).Write(context.Background(), items[:3])
	testenv.Must(t, err, "write rows")
	p.Exec(t, "UPDATE tokens SET state = 'REVOKED' WHERE token_digest = $1", items[0].Event.TokenDigest[:])
	time.Sleep(1100 * time.Millisecond) // so the oldest message has a measurable age

	r, cons := gather(t, p)
	per, rec := cons[p.Topo.Persister], cons[p.Topo.Recovery]
	if per.Pending != 10 || per.AckPending != 0 || per.KEDALag != 10 || !per.Durable || per.Filter != p.Topo.IssuedSubject() {
		t.Fatalf("persister = %+v, want 10 pending", per)
	}
	if per.OldestUnackedSeconds == nil || *per.OldestUnackedSeconds < 1 {
		t.Fatalf("persister oldest unacked = %v, want at least 1s", per.OldestUnackedSeconds)
	}
	if rec.Pending != 0 || rec.KEDALag != 0 || rec.OldestUnackedSeconds != nil {
		t.Fatalf("recovery = %+v, want nothing outstanding", rec)
	}
	s := r.Stream
	if s.Messages != 10 || s.FirstSeq != 1 || s.LastSeq != 10 || s.Subjects[p.Topo.IssuedSubject()] != 10 || s.MaxAgeSeconds != p.Topo.MaxAge.Seconds() || s.MaxBytes != -1 {
		t.Fatalf("stream = %+v", s)
	}
	if r.Rows["ACTIVE"] != 2 || r.Rows["REVOKED"] != 1 || r.Rows["INACTIVE"] != 0 {
		t.Fatalf("rows = %v", r.Rows)
	}

	// A worker takes four and has not acked them yet.
	c, err := p.JS.Consumer(context.Background(), p.Topo.Stream, p.Topo.Persister)
	testenv.Must(t, err, "consumer")
	batch, err := c.Fetch(4, jetstream.FetchMaxWait(2*time.Second))
	testenv.Must(t, err, "fetch")
	var last uint64
	for m := range batch.Messages() {
		meta, _ := m.Metadata()
		last = meta.Sequence.Stream
	}
	r, cons = gather(t, p)
	per = cons[p.Topo.Persister]
	if per.Pending != 6 || per.AckPending != 4 || per.KEDALag != 10 || per.LastDelivered != last || per.LastAcked != 0 {
		t.Fatalf("persister after fetching 4 = %+v (last delivered %d)", per, last)
	}

	// Scripts read the JSON names.
	raw, err := json.Marshal(r)
	testenv.Must(t, err, "marshal")
	var decoded struct {
		Consumers []map[string]any `json:"consumers"`
		Rows      map[string]int64 `json:"rows"`
	}
	testenv.Must(t, json.Unmarshal(raw, &decoded), "unmarshal")
	found := false
	for _, c := range decoded.Consumers {
		if c["name"] == p.Topo.Persister {
			found = true
			if c["num_pending"] != 6.0 || c["num_ack_pending"] != 4.0 || c["keda_lag"] != 10.0 {
				t.Fatalf("persister JSON = %v", c)
			}
		}
	}
	if !found || decoded.Rows["ACTIVE"] != 2 {
		t.Fatalf("JSON = %s", raw)
	}

	var out bytes.Buffer
	r.WriteTable(&out)
	for _, want := range []string{"KEDA LAG", p.Topo.Persister, "max age 1h0m0s", "ACTIVE 2", "REVOKED 1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestStatusShowsAToolConsumerAsEphemeral(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	testenv.Publish(t, p.JS, p.Topo, testenv.Token("app", "x", "read"))
	testenv.Publish(t, p.JS, p.Topo, testenv.Token("app", "y", "read"))
	var seen []status.Consumer
	err := replay.Scan(context.Background(), p.JS, p.Topo.Stream, p.Topo.IssuedSubject(), 1, true, func(jetstream.Msg) error {
		if seen == nil {
			r, err := status.Gather(context.Background(), p.JS, nil, p.Topo)
			if err != nil {
				return err
			}
			seen = r.Consumers
		}
		return nil
	})
	testenv.Must(t, err, "scan")
	if len(seen) != 3 || seen[2].Durable || !strings.HasPrefix(seen[2].Name, replay.ToolPrefix) {
		t.Fatalf("consumers during a scan = %+v, want the two durables and the tool's", seen)
	}
	p.AssertDurablesOnly(t)
}

// TestStatusShowsEveryPartition: each partition's consumer is listed with
// its own backlog and the age of its own oldest message.
func TestStatusShowsEveryPartition(t *testing.T) {
	t.Parallel()
	p := pipetest.New(t)
	p.Partition(t, 3)
	perPartition := make([]uint64, 3)
	for range 12 {
		ev := testenv.Token("app", testenv.Name("u-"), "read")
		testenv.Publish(t, p.JS, p.Topo, ev)
		perPartition[events.Partition(ev.ClientID, ev.Subject, ev.Scope(), 3)]++
	}
	time.Sleep(1100 * time.Millisecond) // so the oldest message has a measurable age

	r, cons := gather(t, p)
	for i, want := range perPartition {
		c, ok := cons[p.Topo.PartitionConsumer(i)]
		if !ok || c.Pending != want || c.KEDALag != want || c.Filter != p.Topo.PartitionSubject(i) {
			t.Fatalf("partition %d: %+v (listed %v), want %d pending on %s", i, c, ok, want, p.Topo.PartitionSubject(i))
		}
		if want > 0 && (c.OldestUnackedSeconds == nil || *c.OldestUnackedSeconds < 1) {
			t.Fatalf("partition %d oldest unacked = %v, want at least 1s", i, c.OldestUnackedSeconds)
		}
		if got := r.Stream.Subjects[p.Topo.PartitionSubject(i)]; got != want {
			t.Fatalf("stream holds %d on partition %d, want %d", got, i, want)
		}
	}
	if per := cons[p.Topo.Persister]; per.Pending != 0 {
		t.Fatalf("unpartitioned consumer = %+v, want nothing: every event went to a partition", per)
	}
}
