// Package status reports the state of the token pipeline for operators and
// scripts: the stream and its retention, every consumer's backlog, and the
// database's rows by state.
package status

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
)

// DB is what status reads rows with: a pool or a connection.
type DB interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Report is one snapshot.
type Report struct {
	Time      time.Time        `json:"time"`
	Stream    Stream           `json:"stream"`
	Consumers []Consumer       `json:"consumers"`
	Rows      map[string]int64 `json:"rows,omitempty"` // tokens by state; absent if not read
	// RowsError says why the rows could not be counted. The stream's view
	// is still reported: status is most needed while the database is down.
	RowsError string `json:"rows_error,omitempty"`
}

// Stream describes the stream and its retention limits, which set how far
// back a replay can reach.
type Stream struct {
	Name          string            `json:"name"`
	Messages      uint64            `json:"messages"`
	Bytes         uint64            `json:"bytes"`
	FirstSeq      uint64            `json:"first_seq"`
	FirstTime     time.Time         `json:"first_time"`
	LastSeq       uint64            `json:"last_seq"`
	LastTime      time.Time         `json:"last_time"`
	MaxAgeSeconds float64           `json:"max_age_seconds"` // 0: no age limit
	MaxBytes      int64             `json:"max_bytes"`       // -1: no size limit
	Replicas      int               `json:"replicas"`
	Subjects      map[string]uint64 `json:"subjects"` // messages per subject
}

// Consumer is one consumer's backlog.
type Consumer struct {
	Name    string `json:"name"`
	Durable bool   `json:"durable"`
	Filter  string `json:"filter_subject"`
	// As the server reports them.
	Pending       uint64 `json:"num_pending"`     // in the stream, not yet delivered
	AckPending    int    `json:"num_ack_pending"` // delivered, not yet acknowledged
	Redelivered   int    `json:"num_redelivered"`
	Waiting       int    `json:"num_waiting"`               // pull requests waiting
	LastDelivered uint64 `json:"last_delivered_stream_seq"` // stream sequence
	LastAcked     uint64 `json:"ack_floor_stream_seq"`      // every message up to here is acked
	// OldestUnackedSeconds is the age of the first message after the ack
	// floor, delivered or not: how far behind the consumer is in time. Nil
	// when nothing is outstanding.
	OldestUnackedSeconds *float64 `json:"oldest_unacked_age_seconds"`
	// KEDALag is what KEDA's nats-jetstream scaler computes:
	// num_pending + num_ack_pending.
	KEDALag uint64 `json:"keda_lag"`
}

// Gather takes a snapshot. db may be nil to skip the row counts, which on a
// very large table cost a scan. A database error does not fail the snapshot;
// it is reported in RowsError.
func Gather(ctx context.Context, js jetstream.JetStream, db DB, topo events.Topology) (*Report, error) {
	stream, err := js.Stream(ctx, topo.Stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(topo.Prefix+".>"))
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", topo.Stream, err)
	}
	now := time.Now()
	r := &Report{Time: now.UTC(), Stream: Stream{
		Name: info.Config.Name, Messages: info.State.Msgs, Bytes: info.State.Bytes,
		FirstSeq: info.State.FirstSeq, FirstTime: info.State.FirstTime.UTC(),
		LastSeq: info.State.LastSeq, LastTime: info.State.LastTime.UTC(),
		MaxAgeSeconds: info.Config.MaxAge.Seconds(), MaxBytes: info.Config.MaxBytes,
		Replicas: info.Config.Replicas, Subjects: info.State.Subjects,
	}}
	if r.Stream.Subjects == nil {
		r.Stream.Subjects = map[string]uint64{}
	}

	list := stream.ListConsumers(ctx)
	for ci := range list.Info() {
		c := Consumer{
			Name: ci.Name, Durable: ci.Config.Durable != "", Filter: filterOf(ci.Config),
			Pending: ci.NumPending, AckPending: ci.NumAckPending, Redelivered: ci.NumRedelivered,
			Waiting: ci.NumWaiting, LastDelivered: ci.Delivered.Stream, LastAcked: ci.AckFloor.Stream,
			KEDALag: ci.NumPending + uint64(ci.NumAckPending),
		}
		if c.KEDALag > 0 {
			age, err := oldestUnacked(ctx, stream, c, topo, now)
			if err != nil {
				return nil, err
			}
			c.OldestUnackedSeconds = age
		}
		r.Consumers = append(r.Consumers, c)
	}
	if err := list.Err(); err != nil {
		return nil, fmt.Errorf("list consumers of %s: %w", topo.Stream, err)
	}
	// Durables first, then by name, so the table does not jump around.
	slices.SortFunc(r.Consumers, func(a, b Consumer) int {
		if a.Durable != b.Durable {
			if a.Durable {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	})

	if db != nil {
		if r.Rows, err = rowsByState(ctx, db); err != nil {
			r.RowsError = err.Error()
		}
	}
	return r, nil
}

func filterOf(cfg jetstream.ConsumerConfig) string {
	if cfg.FilterSubject != "" {
		return cfg.FilterSubject
	}
	return strings.Join(cfg.FilterSubjects, ",")
}

// oldestUnacked reads the first message on the consumer's subject after its
// ack floor and returns its age in seconds, or nil if there is none.
func oldestUnacked(ctx context.Context, stream jetstream.Stream, c Consumer, topo events.Topology, now time.Time) (*float64, error) {
	subject := c.Filter
	if subject == "" || strings.Contains(subject, ",") {
		subject = topo.Prefix + ".>"
	}
	msg, err := stream.GetMsg(ctx, c.LastAcked+1, jetstream.WithGetMsgSubject(subject))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("oldest unacknowledged message of %s: %w", c.Name, err)
	}
	age := max(now.Sub(msg.Time).Seconds(), 0)
	return &age, nil
}

// states lists every state the schema allows, so a zero shows as a zero.
var states = []string{"ACTIVE", "INACTIVE", "REVOKED", "EXPIRED"}

func rowsByState(ctx context.Context, db DB) (map[string]int64, error) {
	out, err := store.RowsByState(ctx, db)
	if err != nil {
		return nil, fmt.Errorf("count rows by state: %w", err)
	}
	for _, s := range states {
		if _, ok := out[s]; !ok {
			out[s] = 0
		}
	}
	return out, nil
}

// WriteTable prints the report for people.
func (r *Report) WriteTable(w io.Writer) {
	s := r.Stream
	fmt.Fprintf(w, "stream %s at %s\n", s.Name, r.Time.Format(time.RFC3339))
	fmt.Fprintf(w, "  messages   %d (%s), replicas %d\n", s.Messages, humanBytes(int64(s.Bytes)), s.Replicas)
	fmt.Fprintf(w, "  first      seq %d  %s\n", s.FirstSeq, timeAgo(s.FirstTime, r.Time))
	fmt.Fprintf(w, "  last       seq %d  %s\n", s.LastSeq, timeAgo(s.LastTime, r.Time))
	maxAge, maxBytes := "unlimited", "unlimited"
	if s.MaxAgeSeconds > 0 {
		maxAge = (time.Duration(s.MaxAgeSeconds * float64(time.Second))).String()
	}
	if s.MaxBytes > 0 {
		maxBytes = humanBytes(s.MaxBytes)
	}
	fmt.Fprintf(w, "  retention  max age %s, max bytes %s (replay reaches back to seq %d)\n", maxAge, maxBytes, s.FirstSeq)
	subjects := make([]string, 0, len(s.Subjects))
	for subj := range s.Subjects {
		subjects = append(subjects, subj)
	}
	slices.Sort(subjects)
	for _, subj := range subjects {
		fmt.Fprintf(w, "  subject    %-32s %d\n", subj, s.Subjects[subj])
	}

	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONSUMER\tFILTER\tPENDING\tACK PENDING\tREDELIVERED\tWAITING\tDELIVERED SEQ\tACKED SEQ\tOLDEST UNACKED\tKEDA LAG")
	for _, c := range r.Consumers {
		name := c.Name
		if !c.Durable {
			name += " (ephemeral)"
		}
		oldest := "-"
		if c.OldestUnackedSeconds != nil {
			oldest = (time.Duration(*c.OldestUnackedSeconds * float64(time.Second))).Round(time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%d\n", name, c.Filter, c.Pending, c.AckPending,
			c.Redelivered, c.Waiting, c.LastDelivered, c.LastAcked, oldest, c.KEDALag)
	}
	_ = tw.Flush()

	if r.RowsError != "" {
		fmt.Fprintf(w, "\ntokens  (not counted: %s)\n", r.RowsError)
	}
	if r.Rows != nil {
		fmt.Fprintln(w)
		var total int64
		var parts []string
		for _, st := range states {
			parts = append(parts, fmt.Sprintf("%s %d", st, r.Rows[st]))
			total += r.Rows[st]
		}
		fmt.Fprintf(w, "tokens  %s  (total %d)\n", strings.Join(parts, "  "), total)
	}
}

func timeAgo(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s (%s ago)", t.Format(time.RFC3339), now.Sub(t).Round(time.Second))
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
