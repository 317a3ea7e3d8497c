// Package grants answers "which applications hold live tokens for this user"
// and "which tokens does this client hold", and withdraws them: the
// management API and CLI share it. It never returns token plaintext; a token
// is named by the first 16 hex digits of its digest.
package grants

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Application is a client holding live tokens for a user.
type Application = store.Application

// Applications lists the clients with an ACTIVE token of subject whose access
// or refresh token is unexpired (see store.Applications).
func Applications(ctx context.Context, db *pgxpool.Pool, subject string) ([]Application, error) {
	apps, err := store.Applications(ctx, db, subject)
	if err != nil {
		return nil, fmt.Errorf("list applications: %w", err)
	}
	return apps, nil
}

// Token is one stored token, without its plaintext.
type Token = store.TokenInfo

// Filter narrows ClientTokens.
type Filter = store.TokenFilter

// ClientTokens lists a client's stored tokens, newest first.
func ClientTokens(ctx context.Context, db *pgxpool.Pool, client string, f Filter) ([]Token, error) {
	toks, err := store.ClientTokens(ctx, db, client, f)
	if err != nil {
		return nil, fmt.Errorf("list tokens of %s: %w", client, err)
	}
	return toks, nil
}

// Revoke revokes every token of subject for client (subject "": of all its
// users), stored or queued. js and stream name the event stream: its last
// sequence, read first, is the watermark that reaches queued tokens. With a
// nil js (sync mode) every token already has its row.
func Revoke(ctx context.Context, db *pgxpool.Pool, js jetstream.JetStream, stream, client, subject, reason string) (store.Revocation, error) {
	upTo, err := watermark(ctx, js, stream)
	if err != nil {
		return store.Revocation{}, err
	}
	return store.RevokeGrant(ctx, db, client, subject, upTo, reason)
}

// watermark is the stream's last sequence, read before a grant revocation:
// every event up to it is covered, queued or stored. 0 without a stream
// (sync mode), where every token already has its row.
func watermark(ctx context.Context, js jetstream.JetStream, stream string) (uint64, error) {
	if js == nil {
		return 0, nil
	}
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("read stream %s: %w", stream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("read stream %s: %w", stream, err)
	}
	return info.State.LastSeq, nil
}

// RevokeUser revokes every token of user at every registered client, stored
// or queued, as Revoke does for one client: what a password reset or the
// removal of a user calls for. One stream watermark covers all clients.
func RevokeUser(ctx context.Context, db *pgxpool.Pool, js jetstream.JetStream, stream, user, reason string) (store.Revocation, error) {
	if user == "" {
		return store.Revocation{}, fmt.Errorf("revoke user: a user is required")
	}
	upTo, err := watermark(ctx, js, stream)
	if err != nil {
		return store.Revocation{}, err
	}
	rows, err := db.Query(ctx, `SELECT client_id FROM clients ORDER BY client_id`)
	if err != nil {
		return store.Revocation{}, fmt.Errorf("list clients: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return store.Revocation{}, fmt.Errorf("list clients: %w", err)
	}
	var all store.Revocation
	for _, id := range ids {
		res, err := store.RevokeGrant(ctx, db, id, user, upTo, reason)
		if err != nil {
			return all, fmt.Errorf("revoke %s at %s: %w", user, id, err)
		}
		all.Digests = append(all.Digests, res.Digests...)
		all.Families += res.Families
	}
	return all, nil
}

// ErrNoApplication: the client does not exist and the subject holds no
// token of it, or a user named the client itself. Nothing was written.
var ErrNoApplication = errors.New("no such application")

// RevokeApplication revokes a user's tokens for a client, for the account
// and admin user routes. A user's revocation never reaches the client's own
// client_credentials tokens (subject = client id): those are the client's,
// not a user's, even if a user shares its name.
func RevokeApplication(ctx context.Context, db *pgxpool.Pool, js jetstream.JetStream, stream, client, user, reason string) (store.Revocation, error) {
	if user == "" || user == client {
		return store.Revocation{}, ErrNoApplication
	}
	return RevokeKnown(ctx, db, js, stream, client, user, reason)
}

// RevokeKnown is Revoke for the management API: it writes a revocation only
// for a client that exists or of which the subject (any subject, when "")
// has stored tokens, so requests naming made-up clients cannot fill
// the grant revocations. An existing client is enough, although the subject may
// hold no row of it: its tokens may still be queued, and refusing would
// leave them working.
func RevokeKnown(ctx context.Context, db *pgxpool.Pool, js jetstream.JetStream, stream, client, subject, reason string) (store.Revocation, error) {
	known, err := store.KnownApplication(ctx, db, client, subject)
	if err != nil {
		return store.Revocation{}, fmt.Errorf("look up application %s: %w", client, err)
	}
	if !known {
		return store.Revocation{}, ErrNoApplication
	}
	return Revoke(ctx, db, js, stream, client, subject, reason)
}
