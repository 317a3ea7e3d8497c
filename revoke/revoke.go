// Package revoke records revocations durably in Postgres and makes them win
// every race with the asynchronous pipeline.
//
// There are three kinds:
//   - Token: one access token. Its row is written REVOKED at once, and if
//     the TokenIssued event is still queued the row is inserted from the
//     token's own claims; the persister then finds the digest taken and
//     leaves it alone, in whichever order the two writes land.
//   - Family: one authorization and every token rotated from it (refresh
//     token revocation, refresh token reuse). Recorded in revoked_families.
//   - Grant: every token of a user for a client, or of all users of a
//     client, whose event JetStream had accepted when the revocation began
//     (a stream sequence watermark). Recorded in revoked_grants.
//
// Queued tokens of a revoked family or grant have no row to update, so every
// writer of token rows (persister, recovery, the sync issuer) asks
// CoveredSQL whether a row it writes is revoked, and writes it REVOKED. The
// check and the revocation would race (each could miss the other's
// uncommitted write), so writers hold the revocation fence shared and family
// and grant revocations hold it exclusively: a revocation waits for the
// batches in flight and the next batches see it. Token revocations need no
// fence: the primary key orders them against the row's insert.
//
// The statements live in internal/store (revoke.go there); this package keeps
// the names callers use and builds the notices.
package revoke

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
	"github.com/tokenpipe/tokenpipe/internal/store"
	"github.com/tokenpipe/tokenpipe/tokens"
)

// Reasons recorded with a revocation.
const (
	ReasonClient = "client_request" // RFC 7009 revocation by the client
	ReasonReuse  = "refresh_reuse"  // a rotated refresh token was presented again
	ReasonUser   = "user_request"   // the user removed the application
	ReasonAdmin  = "admin_request"
)

// Beginner is a pool or a connection.
type Beginner = store.Beginner

// LockShared takes the revocation fence for a transaction that writes token
// rows. Hold it before reading CoveredSQL.
func LockShared(ctx context.Context, tx pgx.Tx) error { return store.LockShared(ctx, tx) }

// CoveredSQL returns a boolean SQL expression: is a token with these column
// expressions (family, client, subject, stream sequence) covered by a family
// or grant revocation? See store.CoveredSQL.
func CoveredSQL(family, client, subject, seq string) string {
	return store.CoveredSQL(family, client, subject, seq)
}

// Result says what a revocation changed.
type Result = store.Revocation

// Token revokes one access token, whose row may not exist yet. The claims
// come from the verified token text.
func Token(ctx context.Context, db Beginner, digest events.Digest, c tokens.Claims) (Result, error) {
	return store.RevokeToken(ctx, db, digest, c)
}

// Family revokes every token of a family, stored or queued.
func Family(ctx context.Context, db Beginner, f tokens.Family, reason string) (Result, error) {
	return store.RevokeFamily(ctx, db, f, reason)
}

// Grant revokes every token of subject for client (subject "" : of every
// user of the client) whose event had stream sequence upToSeq or lower, and
// the families of the stored ones, so a refresh racing with the revocation
// cannot mint a survivor. Pass the stream's last sequence read just before;
// 0 where there is no stream (sync mode: every token already has its row).
func Grant(ctx context.Context, db Beginner, client, subject string, upToSeq uint64, reason string) (Result, error) {
	return store.RevokeGrant(ctx, db, client, subject, upToSeq, reason)
}

// Notice builds the TokenRevoked notice for a result.
func Notice(res Result, reason string) *events.TokenRevoked {
	return &events.TokenRevoked{Digests: res.Digests, Reason: reason, RevokedAt: time.Now().UTC()}
}
