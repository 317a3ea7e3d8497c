package testenv

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/tokens"
)

// Token returns a TokenIssued event with a random token digest for the key
// (client, subject, scopes).
func Token(client, subject string, scopes ...string) *events.TokenIssued {
	var d events.Digest
	_, _ = rand.Read(d[:])
	now := time.Now().UTC().Truncate(time.Microsecond)
	return &events.TokenIssued{
		Version: events.Version, Type: events.TypeTokenIssued,
		TokenDigest: d, ClientID: client, Subject: subject,
		Scopes: events.CanonicalScopes(joinScopes(scopes)), GrantType: "client_credentials",
		IssuedAt: now, ExpiresAt: now.Add(time.Hour), Instance: "test",
	}
}

func joinScopes(s []string) string {
	out := ""
	for _, x := range s {
		out += x + " "
	}
	return out
}

// Publish publishes ev to its issued subject (its key's partition, when
// topo is partitioned) the way the issuer does and returns its stream
// sequence.
func Publish(t testing.TB, js jetstream.JetStream, topo events.Topology, ev *events.TokenIssued) uint64 {
	t.Helper()
	body, err := events.EncodeTokenIssued(ev)
	Must(t, err, "encode event")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := js.Publish(ctx, topo.IssuedSubjectOf(ev.ClientID, ev.Subject, ev.Scope()), body, jetstream.WithMsgID(ev.TokenDigest.String()))
	Must(t, err, "publish event")
	return ack.Sequence
}

// PublishRaw publishes arbitrary bytes to subject without deduplication.
func PublishRaw(t testing.TB, js jetstream.JetStream, subject string, body []byte) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ack, err := js.Publish(ctx, subject, body)
	Must(t, err, "publish raw")
	return ack.Sequence
}

// KeyText is the token signing key tests share, in TOKENPIPE_TOKEN_KEYS form.
const KeyText = "746f6b656e706970652d746573742d6b65792d6e6f742d666f722d70726f6421"

// Keys returns the keyring of KeyText.
func Keys() *tokens.Keyring {
	kr, err := tokens.ParseKeys(KeyText)
	if err != nil {
		panic(err)
	}
	return kr
}
