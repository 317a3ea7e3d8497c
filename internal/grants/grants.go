// Package grants answers "which applications hold live tokens for this user"
// and "which tokens does this client hold", and withdraws them: the
// management API and CLI share it. It never returns token plaintext; a token
// is named by the first 16 hex digits of its digest.
package grants

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenpipe/tokenpipe/internal/store"
)

// Application is a client holding live tokens for a user.
type Application struct {
	ClientID         string     `json:"client_id"`
	Scopes           []string   `json:"scopes"`
	IssuedAt         time.Time  `json:"issued_at"`  // newest live token
	ExpiresAt        time.Time  `json:"expires_at"` // latest access token expiry
	RefreshExpiresAt *time.Time `json:"refresh_expires_at,omitempty"`
	Tokens           int        `json:"tokens"`
}

// Applications lists the clients with an ACTIVE token of subject whose access
// or refresh token is unexpired. Tokens still queued are not listed yet.
// A client's own tokens (client_credentials, whose subject is the client id)
// are never a user's application, even if a user shares the client's name.
func Applications(ctx context.Context, db *pgxpool.Pool, subject string) ([]Application, error) {
	rows, err := db.Query(ctx, `
		SELECT client_id, array_agg(DISTINCT scope), max(issued_at), max(expires_at), max(refresh_expires_at), count(*)
		FROM tokens
		WHERE subject = $1 AND state = 'ACTIVE' AND coalesce(refresh_expires_at, expires_at) > now()
		  AND subject <> client_id AND grant_type <> 'client_credentials'
		GROUP BY client_id ORDER BY client_id`, subject)
	if err != nil {
		return nil, fmt.Errorf("list applications: %w", err)
	}
	apps, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Application, error) {
		var a Application
		var scopes []string
		err := r.Scan(&a.ClientID, &scopes, &a.IssuedAt, &a.ExpiresAt, &a.RefreshExpiresAt, &a.Tokens)
		for _, s := range scopes {
			a.Scopes = append(a.Scopes, strings.Fields(s)...)
		}
		slices.Sort(a.Scopes)
		a.Scopes = slices.Compact(a.Scopes)
		if a.Scopes == nil {
			a.Scopes = []string{}
		}
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("list applications: %w", err)
	}
	return apps, nil
}

// Token is one stored token, without its plaintext.
type Token struct {
	ID               string     `json:"id"` // first 16 hex digits of the digest
	Subject          string     `json:"sub"`
	Scope            string     `json:"scope"`
	State            string     `json:"state"`
	GrantType        string     `json:"grant_type"`
	IssuedAt         time.Time  `json:"issued_at"`
	ExpiresAt        time.Time  `json:"expires_at"`
	RefreshExpiresAt *time.Time `json:"refresh_expires_at,omitempty"`
}

// Filter narrows ClientTokens.
type Filter struct {
	Subject string // "" for every subject
	State   string // "" for every state
	Limit   int    // at most this many, newest first; 0 means 100
}

// ClientTokens lists a client's stored tokens, newest first.
func ClientTokens(ctx context.Context, db *pgxpool.Pool, client string, f Filter) ([]Token, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	rows, err := db.Query(ctx, `
		SELECT token_digest, subject, scope, state, grant_type, issued_at, expires_at, refresh_expires_at
		FROM tokens
		WHERE client_id = $1 AND ($2 = '' OR subject = $2) AND ($3 = '' OR state = $3)
		ORDER BY issued_at DESC LIMIT $4`, client, f.Subject, f.State, f.Limit)
	if err != nil {
		return nil, fmt.Errorf("list tokens of %s: %w", client, err)
	}
	toks, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Token, error) {
		var t Token
		var d []byte
		err := r.Scan(&d, &t.Subject, &t.Scope, &t.State, &t.GrantType, &t.IssuedAt, &t.ExpiresAt, &t.RefreshExpiresAt)
		t.ID = hex.EncodeToString(d[:min(8, len(d))])
		return t, err
	})
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
// revoked_grants. An existing client is enough, although the subject may
// hold no row of it: its tokens may still be queued, and refusing would
// leave them working.
func RevokeKnown(ctx context.Context, db *pgxpool.Pool, js jetstream.JetStream, stream, client, subject, reason string) (store.Revocation, error) {
	var known bool
	err := db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM clients WHERE client_id = $1)
		OR EXISTS (SELECT 1 FROM tokens WHERE client_id = $1 AND ($2 = '' OR subject = $2))`, client, subject).Scan(&known)
	if err != nil {
		return store.Revocation{}, fmt.Errorf("look up application %s: %w", client, err)
	}
	if !known {
		return store.Revocation{}, ErrNoApplication
	}
	return Revoke(ctx, db, js, stream, client, subject, reason)
}
