package events

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Headers set on derived messages. They carry routing facts, never secrets.
const (
	// HeaderOriginSeq is the stream sequence of the TokenIssued event a
	// conflict or dead letter was derived from. Recovery orders racing tokens
	// by it.
	HeaderOriginSeq = "Tokenpipe-Origin-Seq"
	// HeaderOriginSubject is the subject the dead-lettered message came from.
	HeaderOriginSubject = "Tokenpipe-Origin-Subject"
	// HeaderReason says why a message was dead-lettered.
	HeaderReason = "Tokenpipe-Reason"
)

// Topology names the stream, its subjects and its durable consumers. Every
// role derives its names from one Topology so tests and deployments can run
// side by side under different prefixes.
type Topology struct {
	Stream     string        // JetStream stream name
	Prefix     string        // subject prefix, e.g. "tokenpipe"
	MaxAge     time.Duration // retention: how far back a replay can reach
	MaxBytes   int64         // retention by size; -1 for unlimited
	Replicas   int           // stream replicas (3 in a production cluster)
	Duplicates time.Duration // Nats-Msg-Id deduplication window
	Persister  string        // durable consumer name of the persister pool
	Recovery   string        // durable consumer name of the recovery consumer
	AckWait    time.Duration // how long a delivered message may stay unacknowledged
	MaxPending int           // MaxAckPending of each durable consumer
	// Partitions, when above 1, splits the issued subject by a hash of the
	// token's key into PREFIX.issued.0 .. PREFIX.issued.<N-1>, each with its
	// own persister consumer, so one writer handles every event of a key.
	// 0 and 1 mean one unpartitioned subject, as before partitions existed.
	Partitions int
}

// MaxPartitions bounds Partitions: each partition is a durable consumer.
const MaxPartitions = 1024

// IssuedSubject is the unpartitioned subject of TokenIssued events: all of
// them when Partitions <= 1, and those published before partitioning was
// turned on otherwise.
func (t Topology) IssuedSubject() string { return t.Prefix + ".issued" }

// Partitioned reports whether the issued subject is split by key.
func (t Topology) Partitioned() bool { return t.Partitions > 1 }

// IssuedSubjectOf is the subject an issuer publishes the event of this key
// to: the key's partition, or the unpartitioned subject.
func (t Topology) IssuedSubjectOf(clientID, subject, scope string) string {
	if !t.Partitioned() {
		return t.IssuedSubject()
	}
	return t.PartitionSubject(Partition(clientID, subject, scope, t.Partitions))
}

// PartitionSubject carries the TokenIssued events of partition p.
func (t Topology) PartitionSubject(p int) string { return t.IssuedSubject() + "." + strconv.Itoa(p) }

// IssuedFilter selects every TokenIssued event of the current layout: the
// unpartitioned subject, or every partition's.
func (t Topology) IssuedFilter() string {
	if !t.Partitioned() {
		return t.IssuedSubject()
	}
	return t.IssuedSubject() + ".*"
}

// IsIssuedSubject reports whether s carries TokenIssued events from the
// issuers, partitioned or not (whatever Partitions is now: the stream may
// hold events from before a change).
func (t Topology) IsIssuedSubject(s string) bool {
	if s == t.IssuedSubject() {
		return true
	}
	rest, ok := strings.CutPrefix(s, t.IssuedSubject()+".")
	if !ok {
		return false
	}
	p, err := strconv.Atoi(rest)
	return err == nil && p >= 0 && strconv.Itoa(p) == rest
}

// Partition is the partition of a key (client, subject, scope) among n:
// FNV-1a over the key's fields, so every issuer computes the same one
// without coordination. The fields are separated by a NUL, which none of
// them may contain, so distinct keys never hash the same bytes.
func Partition(clientID, subject, scope string, n int) int {
	if n <= 1 {
		return 0
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte(clientID))
	_, _ = h.Write([]byte{0})
	_, _ = h.Write([]byte(subject))
	_, _ = h.Write([]byte{0})
	_, _ = h.Write([]byte(scope))
	return int(h.Sum64() % uint64(n))
}

// PartitionConsumer names the durable consumer of partition p.
func (t Topology) PartitionConsumer(p int) string { return t.Persister + "-p" + strconv.Itoa(p) }

// PersisterConsumers names every durable consumer persisters read: the
// unpartitioned one, and each partition's when partitioned.
func (t Topology) PersisterConsumers() []string {
	names := []string{t.Persister}
	for p := 0; t.Partitioned() && p < t.Partitions; p++ {
		names = append(names, t.PartitionConsumer(p))
	}
	return names
}

// ForPartition is the topology as the persister of partition p sees it: its
// Persister is the partition's consumer.
func (t Topology) ForPartition(p int) Topology {
	t.Persister = t.PartitionConsumer(p)
	return t
}

// ConflictSubject carries TokenIssued events that hit the one-ACTIVE
// constraint, for the recovery consumer.
func (t Topology) ConflictSubject() string { return t.Prefix + ".conflict" }

// DeactivatedSubject carries TokenDeactivated notices for gateways.
func (t Topology) DeactivatedSubject() string { return t.Prefix + ".deactivated" }

// RevokedSubject carries TokenRevoked notices for introspection caches.
func (t Topology) RevokedSubject() string { return t.Prefix + ".revoked" }

// DeadSubject carries poison messages with the reason they were rejected.
func (t Topology) DeadSubject() string { return t.Prefix + ".dead" }

// Validate reports the first unusable field.
func (t Topology) Validate() error {
	switch {
	case t.Stream == "":
		return errors.New("stream name is empty")
	case t.Prefix == "":
		return errors.New("subject prefix is empty")
	case t.Persister == "" || t.Recovery == "":
		return errors.New("consumer names are empty")
	case t.Replicas < 1:
		return errors.New("replicas must be at least 1")
	case t.MaxAge < 0:
		return errors.New("max age is negative")
	case t.AckWait < time.Second:
		return errors.New("ack wait is shorter than 1s")
	case t.MaxPending < 1:
		return errors.New("max ack pending must be at least 1")
	case t.Partitions < 0 || t.Partitions > MaxPartitions:
		return fmt.Errorf("partitions must be between 1 and %d", MaxPartitions)
	}
	return nil
}

// StreamConfig is the stream every role expects. Limits retention (not
// work-queue) keeps acknowledged events so operators can replay them.
func (t Topology) StreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:        t.Stream,
		Description: "tokenpipe token events",
		Subjects:    []string{t.Prefix + ".>"},
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      t.MaxAge,
		MaxBytes:    t.MaxBytes,
		MaxMsgSize:  MaxEventBytes * 2,
		Storage:     jetstream.FileStorage,
		Replicas:    t.Replicas,
		Duplicates:  t.Duplicates,
		Discard:     jetstream.DiscardOld,
	}
}

func (t Topology) consumerConfig(name, subject, desc string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       name,
		Description:   desc,
		FilterSubject: subject,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       t.AckWait,
		// Unlimited deliveries: a message we cannot process is terminated and
		// dead-lettered by our own code; a transient failure must never make
		// the server give up on a token silently.
		MaxDeliver:    -1,
		MaxAckPending: t.MaxPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		ReplayPolicy:  jetstream.ReplayInstantPolicy,
	}
}

// PersisterConsumerConfig is the persister pool's durable pull consumer.
func (t Topology) PersisterConsumerConfig() jetstream.ConsumerConfig {
	return t.consumerConfig(t.Persister, t.IssuedSubject(), "tokenpipe persister pool")
}

// PartitionConsumerConfig is the durable pull consumer of partition p.
func (t Topology) PartitionConsumerConfig(p int) jetstream.ConsumerConfig {
	return t.consumerConfig(t.PartitionConsumer(p), t.PartitionSubject(p), "tokenpipe persister, partition "+strconv.Itoa(p))
}

// RecoveryConsumerConfig is the recovery consumer's durable pull consumer.
func (t Topology) RecoveryConsumerConfig() jetstream.ConsumerConfig {
	return t.consumerConfig(t.Recovery, t.ConflictSubject(), "tokenpipe conflict recovery")
}

// Provision creates or updates the stream and the durable consumers: the
// persisters' (the unpartitioned one always, so events published before
// partitioning was turned on are still read, and one per partition) and
// recovery's. It is idempotent and safe when many pods start at once: a lost
// creation race is retried, and the loser then finds the winner's identical
// configuration.
func Provision(ctx context.Context, js jetstream.JetStream, t Topology) (jetstream.Stream, error) {
	if err := t.Validate(); err != nil {
		return nil, fmt.Errorf("provision: %w", err)
	}
	var stream jetstream.Stream
	err := retryRace(ctx, func() error {
		s, err := js.CreateOrUpdateStream(ctx, t.StreamConfig())
		stream = s
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("provision stream %s: %w", t.Stream, err)
	}
	configs := []jetstream.ConsumerConfig{t.PersisterConsumerConfig(), t.RecoveryConsumerConfig()}
	for p := 0; t.Partitioned() && p < t.Partitions; p++ {
		configs = append(configs, t.PartitionConsumerConfig(p))
	}
	for _, cfg := range configs {
		err := retryRace(ctx, func() error {
			_, err := stream.CreateOrUpdateConsumer(ctx, cfg)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("provision consumer %s: %w", cfg.Durable, err)
		}
	}
	return stream, nil
}

// retryRace retries an idempotent create-or-update a few times: two pods that
// both find the object missing both try to create it, and one loses.
func retryRace(ctx context.Context, op func() error) error {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		if err = op(); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(time.Duration(50*(attempt+1)) * time.Millisecond):
		}
	}
	return err
}
