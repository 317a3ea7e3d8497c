// Token exchange (per-request rotation): the first exchange of each access
// token, and the rule that keeps the presented token valid for its batch
// window while its successor holds the key.

package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

// States of an access token as introspection, the issuer and the tests
// name them. ACTIVE, INACTIVE and REVOKED are row states; ROTATED is an
// INACTIVE (or ACTIVE, or queued) row whose token was exchanged and whose
// batch window is still open; QUEUED is a token whose event has no row yet.
const (
	StateActive   = "ACTIVE"
	StateInactive = "INACTIVE"
	StateRevoked  = "REVOKED"
	StateRotated  = "ROTATED"
	StateQueued   = "QUEUED"
)

// Exchange is an access token's first exchange, as recorded.
type Exchange struct {
	At       time.Time // UTC, whole milliseconds: the successor derives from it
	Answered bool      // the successor was handed out; the window runs
	Closed   bool      // answered, and the database's clock is past the window
}

// RecordExchange records the first exchange of an access token, by the
// database's clock. The window starts only with the first answer
// (MarkExchangeAnswered). It reports false, without error, when an exchange
// was recorded before; only a later statement (ReadExchange) can see one
// that committed while this one waited.
func RecordExchange(ctx context.Context, db Querier, d events.Digest, expiresAt time.Time) (time.Time, bool, error) {
	var at time.Time
	err := db.QueryRow(ctx, `INSERT INTO token_exchanges (subject_digest, exchanged_at, expires_at)
		VALUES ($1, date_trunc('milliseconds', clock_timestamp()), $2)
		ON CONFLICT DO NOTHING RETURNING exchanged_at`, d[:], expiresAt).Scan(&at)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, fmt.Errorf("record exchange: %w", err)
	}
	return at.UTC(), true, nil
}

// ReadExchange reads an access token's recorded exchange; ok is false when
// it was never exchanged.
func ReadExchange(ctx context.Context, db Querier, d events.Digest) (x Exchange, ok bool, err error) {
	err = db.QueryRow(ctx, `SELECT exchanged_at, answered_at IS NOT NULL, coalesce(clock_timestamp() > valid_until, false)
		FROM token_exchanges WHERE subject_digest = $1`, d[:]).Scan(&x.At, &x.Answered, &x.Closed)
	if errors.Is(err, pgx.ErrNoRows) {
		return x, false, nil
	}
	if err != nil {
		return x, false, fmt.Errorf("read exchange: %w", err)
	}
	x.At = x.At.UTC()
	return x, true, nil
}

// MarkExchangeAnswered records that the successor was handed out: the
// presented token stays valid for window from now, and an exchange after
// that is refused. Only the first answer counts, so the window never moves.
func MarkExchangeAnswered(ctx context.Context, db Querier, d events.Digest, window time.Duration) error {
	_, err := db.Exec(ctx, `UPDATE token_exchanges SET answered_at = clock_timestamp(), valid_until = clock_timestamp() + $2::interval
		WHERE subject_digest = $1 AND answered_at IS NULL`, d[:], window)
	if err != nil {
		return fmt.Errorf("record exchange as answered: %w", err)
	}
	return nil
}

// Effective is the one rule for an unexpired access token's state, used by
// introspection, the token exchange and the tests that compare writers:
//
//   - never exchanged: its row's state (QUEUED, and live, while the event is
//     queued and no family or grant revocation covers it);
//   - exchanged, window open (or not started: no exchange was answered, so
//     nobody holds the successor): ROTATED (live) while its row is ACTIVE or
//     queued, or INACTIVE with its own family still holding the key (the
//     successor, or the successor's successor, is the key's ACTIVE row;
//     before any answer, only the successor itself: successorHoldsKey);
//     REVOKED rows stay REVOKED; superseded by another authorization (a new
//     sign-in on another device), it is INACTIVE like any superseded token;
//   - exchanged, window closed: INACTIVE whatever its row says (REVOKED
//     stays REVOKED).
//
// Writers of rows never look at exchanges: the successor's higher stream
// sequence makes it the key's ACTIVE row and the presented token's row
// INACTIVE in every order, so the persister, recovery and replay need no
// new case, and only this reading of the row differs.
func (st AccessStatus) Effective() string {
	row := StateQueued
	if st.State != nil {
		row = *st.State
	}
	if row == StateQueued && (st.FamilyRevoked || st.GrantRevoked) {
		row = StateRevoked
	}
	if !st.Exchanged || row == StateRevoked || row == "EXPIRED" {
		return row
	}
	if !st.WindowOpen {
		return StateInactive
	}
	if row == StateInactive && !st.FamilyHoldsKey {
		return StateInactive
	}
	return StateRotated
}

// Live reports whether Effective says the token may be used.
func (st AccessStatus) Live() bool {
	switch st.Effective() {
	case StateActive, StateQueued, StateRotated:
		return true
	}
	return false
}

// effectiveSQL reads, for every stored token, what Effective needs. A row
// has had every revocation applied on its way in, so the revocation tables
// need not be read.
const effectiveSQL = `
SELECT t.token_digest, t.state, x.subject_digest IS NOT NULL, coalesce(clock_timestamp() <= x.valid_until, true),
       x.subject_digest IS NOT NULL AND EXISTS (SELECT 1 FROM tokens a
           WHERE a.client_id = t.client_id AND a.subject = t.subject AND a.scope = t.scope
             AND a.state = 'ACTIVE' AND a.family_id = t.family_id AND ` + successorHoldsKey + `)
FROM tokens t LEFT JOIN token_exchanges x ON x.subject_digest = t.token_digest`

// successorHoldsKey narrows "the family holds the key" (a, the key's ACTIVE
// row of the exchanged token's family; x, the token's exchange) for an
// exchange never answered: then nobody holds the successor, nor any
// token exchanged from it, so only the successor itself (the token-exchange
// token issued at the exchange's time) keeps the presented token alive. A
// refresh of the family that superseded the token, or a successor of that,
// must leave it INACTIVE: the window never started and would never end. An
// answered exchange's token lives to valid_until at most whoever holds the
// key.
const successorHoldsKey = `(x.valid_until IS NOT NULL OR
               (a.grant_type = 'urn:ietf:params:oauth:grant-type:token-exchange' AND a.issued_at = x.exchanged_at))`

// EffectiveStates reads every stored token's state under the exchange rule
// (Effective): what introspection answers for it. The tests that compare
// writers read states through it, so they judge a ROTATED token as
// introspection does. It reads the whole table: for tests and small tools.
func EffectiveStates(ctx context.Context, db Querier) (map[events.Digest]string, error) {
	rows, err := db.Query(ctx, effectiveSQL)
	if err != nil {
		return nil, fmt.Errorf("read token states: %w", err)
	}
	out := map[events.Digest]string{}
	var d []byte
	var state string
	var st AccessStatus
	_, err = pgx.ForEachRow(rows, []any{&d, &state, &st.Exchanged, &st.WindowOpen, &st.FamilyHoldsKey}, func() error {
		st.State = &state
		out[events.Digest(d)] = st.Effective()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read token states: %w", err)
	}
	return out, nil
}

// PrincipalExists reports whether a token's subject still exists: the client
// itself for a client's own token, else a user created no later than
// userBefore (a removed user's name given to someone new is not theirs).
func PrincipalExists(ctx context.Context, db Querier, clientID, subject string, userBefore time.Time) (bool, error) {
	var ok bool
	err := db.QueryRow(ctx, `SELECT $2 = $1 OR EXISTS (SELECT 1 FROM users WHERE username = $2 AND created_at <= $3)`,
		clientID, subject, userBefore).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("read the token's user: %w", err)
	}
	return ok, nil
}
