package events

import (
	"context"
	"errors"
	"fmt"
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
}

// IssuedSubject carries TokenIssued events from the issuers.
func (t Topology) IssuedSubject() string { return t.Prefix + ".issued" }

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

// RecoveryConsumerConfig is the recovery consumer's durable pull consumer.
func (t Topology) RecoveryConsumerConfig() jetstream.ConsumerConfig {
	return t.consumerConfig(t.Recovery, t.ConflictSubject(), "tokenpipe conflict recovery")
}

// Provision creates or updates the stream and both durable consumers. It is
// idempotent and safe when many pods start at once: a lost creation race is
// retried, and the loser then finds the winner's identical configuration.
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
	for _, cfg := range []jetstream.ConsumerConfig{t.PersisterConsumerConfig(), t.RecoveryConsumerConfig()} {
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
