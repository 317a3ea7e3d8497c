// Operator reads: the applications and tokens the management API lists, and
// the table-wide checks of audit and status. They only read.

package store

import (
	"context"
	"encoding/hex"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenpipe/tokenpipe/events"
)

// Application is a client holding live tokens for a user.
type Application struct {
	ClientID         string     `json:"client_id"`
	Scopes           []string   `json:"scopes"`
	FirstIssuedAt    time.Time  `json:"first_issued_at"` // oldest unrevoked token on record: when it was authorized
	IssuedAt         time.Time  `json:"issued_at"`       // newest live token
	ExpiresAt        time.Time  `json:"expires_at"`      // latest access token expiry
	RefreshExpiresAt *time.Time `json:"refresh_expires_at,omitempty"`
	Tokens           int        `json:"tokens"`
}

// Applications lists the clients with an ACTIVE token of subject whose access
// or refresh token is unexpired. Tokens still queued are not listed yet.
// A client's own tokens (client_credentials, whose subject is the client id)
// are never a user's application, even if a user shares the client's name.
func Applications(ctx context.Context, db Querier, subject string) ([]Application, error) {
	rows, err := db.Query(ctx, `
		SELECT t.client_id, array_agg(DISTINCT t.scope),
		       (SELECT min(f.issued_at) FROM tokens f
		        WHERE f.client_id = t.client_id AND f.subject = t.subject AND f.state <> 'REVOKED'),
		       max(t.issued_at), max(t.expires_at), max(t.refresh_expires_at), count(*)
		FROM tokens t
		WHERE t.subject = $1 AND t.state = 'ACTIVE' AND coalesce(t.refresh_expires_at, t.expires_at) > now()
		  AND t.subject <> t.client_id AND t.grant_type <> 'client_credentials'
		GROUP BY t.client_id, t.subject ORDER BY t.client_id`, subject)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Application, error) {
		var a Application
		var scopes []string
		err := r.Scan(&a.ClientID, &scopes, &a.FirstIssuedAt, &a.IssuedAt, &a.ExpiresAt, &a.RefreshExpiresAt, &a.Tokens)
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
}

// LiveTokensByClient counts, per client, the ACTIVE rows whose access or
// refresh token is unexpired: what the admin page lists. Tokens still
// queued are not counted yet.
func LiveTokensByClient(ctx context.Context, db Querier) (map[string]int64, error) {
	rows, err := db.Query(ctx, `
		SELECT client_id, count(*) FROM tokens
		WHERE state = 'ACTIVE' AND coalesce(refresh_expires_at, expires_at) > now()
		GROUP BY client_id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var c string
		var n int64
		if err := rows.Scan(&c, &n); err != nil {
			return nil, err
		}
		out[c] = n
	}
	return out, rows.Err()
}

// TokenInfo is one stored token, without its plaintext.
type TokenInfo struct {
	ID               string     `json:"id"` // first 16 hex digits of the digest
	Subject          string     `json:"sub"`
	Scope            string     `json:"scope"`
	State            string     `json:"state"`
	GrantType        string     `json:"grant_type"`
	IssuedAt         time.Time  `json:"issued_at"`
	ExpiresAt        time.Time  `json:"expires_at"`
	RefreshExpiresAt *time.Time `json:"refresh_expires_at,omitempty"`
}

// TokenFilter narrows ClientTokens.
type TokenFilter struct {
	Subject string // "" for every subject
	State   string // "" for every state
	Limit   int    // at most this many, newest first; 0 means 100
}

// ClientTokens lists a client's stored tokens, newest first.
func ClientTokens(ctx context.Context, db Querier, client string, f TokenFilter) ([]TokenInfo, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	rows, err := db.Query(ctx, `
		SELECT token_digest, subject, scope, state, grant_type, issued_at, expires_at, refresh_expires_at
		FROM tokens
		WHERE client_id = $1 AND ($2 = '' OR subject = $2) AND ($3 = '' OR state = $3)
		ORDER BY issued_at DESC LIMIT $4`, client, f.Subject, f.State, f.Limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (TokenInfo, error) {
		var t TokenInfo
		var d []byte
		err := r.Scan(&d, &t.Subject, &t.Scope, &t.State, &t.GrantType, &t.IssuedAt, &t.ExpiresAt, &t.RefreshExpiresAt)
		t.ID = hex.EncodeToString(d[:min(8, len(d))])
		return t, err
	})
}

// KnownApplication reports whether client exists or subject (any subject,
// when "") has stored tokens of it.
func KnownApplication(ctx context.Context, db Querier, client, subject string) (bool, error) {
	var known bool
	err := db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM clients WHERE client_id = $1)
		OR EXISTS (SELECT 1 FROM tokens WHERE client_id = $1 AND ($2 = '' OR subject = $2))`, client, subject).Scan(&known)
	return known, err
}

// RowCounts returns the digests that do not have exactly one row, with
// their number of rows (0 or more than 1).
func RowCounts(ctx context.Context, db Querier, digests []events.Digest) (map[events.Digest]int, error) {
	// One probe per digest, planned each time: see planEachTime.
	rows, err := db.Query(ctx, `
		SELECT d.digest, c.n
		FROM (SELECT DISTINCT digest FROM unnest($1::bytea[]) AS u(digest)) d
		CROSS JOIN LATERAL (SELECT count(*) AS n FROM tokens t WHERE t.token_digest = d.digest) c
		WHERE c.n <> 1`, planEachTime, rawDigests(digests))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[events.Digest]int{}
	for rows.Next() {
		var d []byte
		var n int
		if err := rows.Scan(&d, &n); err != nil {
			return nil, err
		}
		out[events.Digest(d)] = n
	}
	return out, rows.Err()
}

// DoubleActiveKeys lists the keys (client/subject/scope) with more than one
// ACTIVE row: what the partial unique index forbids.
func DoubleActiveKeys(ctx context.Context, db Querier) ([]string, error) {
	return keyList(ctx, db, `
		SELECT client_id, subject, scope FROM tokens WHERE state = 'ACTIVE'
		GROUP BY 1, 2, 3 HAVING count(*) > 1`)
}

// ActiveNotNewestKeys lists the keys whose ACTIVE row is older (by stream
// sequence) than another row of the key.
func ActiveNotNewestKeys(ctx context.Context, db Querier) ([]string, error) {
	return keyList(ctx, db, `
		SELECT a.client_id, a.subject, a.scope FROM tokens a
		WHERE a.state = 'ACTIVE' AND a.stream_seq IS NOT NULL AND EXISTS (
			SELECT 1 FROM tokens n
			WHERE n.client_id = a.client_id AND n.subject = a.subject AND n.scope = a.scope
			  AND n.stream_seq > a.stream_seq)`)
}

func keyList(ctx context.Context, db Querier, sql string) ([]string, error) {
	rows, err := db.Query(ctx, sql)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var c, s, sc string
		if err := rows.Scan(&c, &s, &sc); err != nil {
			return nil, err
		}
		out = append(out, c+"/"+s+"/"+sc)
	}
	return out, rows.Err()
}

// windowSQL groups token rows by key and window of issued_at. Refresh-grant
// rows are left out: coalescing does not apply to them, and sequential
// refreshes rightly mint one token each.
const windowSQL = `
WITH c AS (
	SELECT client_id, subject, scope,
	       floor(extract(epoch FROM issued_at) * 1000 / $1::bigint)::bigint AS w,
	       count(*) AS n
	FROM tokens
	WHERE grant_type <> 'refresh_token'
	  AND ($2::text = '' OR client_id = $2)
	  AND issued_at >= $3
	GROUP BY 1, 2, 3, 4
)
SELECT client_id, subject, scope, w * $1::bigint, n, count(*) FILTER (WHERE n > $4) OVER ()
FROM c
ORDER BY n DESC, w, client_id COLLATE "C", subject COLLATE "C", scope COLLATE "C"
LIMIT 1`

// KeyWindow is the busiest key-window of the tokens table.
type KeyWindow struct {
	Key     Key
	StartMs int64 // the window's start, Unix milliseconds
	Tokens  int
	Over    int // key-windows with more than the bound's tokens
}

// BusiestWindow returns the key-window (of windowMs milliseconds) with the
// most token rows issued since since, of client ("" for all), and how many
// key-windows hold more than bound rows. ok is false when no row matches.
func BusiestWindow(ctx context.Context, db Querier, windowMs int64, client string, since time.Time, bound int) (c KeyWindow, ok bool, err error) {
	err = db.QueryRow(ctx, windowSQL, windowMs, client, since, bound).
		Scan(&c.Key.ClientID, &c.Key.Subject, &c.Key.Scope, &c.StartMs, &c.Tokens, &c.Over)
	if errors.Is(err, pgx.ErrNoRows) {
		return KeyWindow{}, false, nil
	}
	return c, err == nil, err
}

// RowState is the state of one token's row.
type RowState struct {
	Digest         events.Digest
	State          string
	StateChangedAt time.Time
	PersistedAt    time.Time
	StreamSeq      int64 // 0 for rows without one (sync mode, revocations)
}

// RowStates reads the state of the given tokens' rows; tokens without a row
// are left out.
func RowStates(ctx context.Context, db Querier, digests []events.Digest) ([]RowState, error) {
	// One probe per digest, planned each time: see planEachTime.
	rows, err := db.Query(ctx, `
SELECT t.token_digest, t.state, t.state_changed_at, t.persisted_at, coalesce(t.stream_seq, 0)
FROM (SELECT DISTINCT digest FROM unnest($1::bytea[]) AS u(digest)) d
CROSS JOIN LATERAL (SELECT * FROM tokens t WHERE t.token_digest = d.digest) t`, planEachTime, rawDigests(digests))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []RowState
	for rows.Next() {
		var d []byte
		var r RowState
		if err := rows.Scan(&d, &r.State, &r.StateChangedAt, &r.PersistedAt, &r.StreamSeq); err != nil {
			return nil, err
		}
		r.Digest = events.Digest(d)
		out = append(out, r)
	}
	return out, rows.Err()
}

// RowsByState counts the rows of each state.
func RowsByState(ctx context.Context, db interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}) (map[string]int64, error) {
	rows, err := db.Query(ctx, `SELECT state, count(*) FROM tokens GROUP BY state`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var s string
		var n int64
		if err := rows.Scan(&s, &n); err != nil {
			return nil, err
		}
		out[s] = n
	}
	return out, rows.Err()
}

// CountRows counts the rows the given tokens have.
func CountRows(ctx context.Context, db Querier, digests []events.Digest) (int, error) {
	var n int
	// One probe per digest, planned each time: see planEachTime.
	err := db.QueryRow(ctx, `
SELECT count(*) FROM (SELECT DISTINCT digest FROM unnest($1::bytea[]) AS u(digest)) d
WHERE (SELECT true FROM tokens t WHERE t.token_digest = d.digest)`, planEachTime, rawDigests(digests)).Scan(&n)
	return n, err
}

// ClientStates counts a client's rows by state.
func ClientStates(ctx context.Context, db Querier, client string) (map[string]int64, error) {
	rows, err := db.Query(ctx, `SELECT state, count(*) FROM tokens WHERE client_id = $1 GROUP BY state`, client)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var st string
		var n int64
		if err := rows.Scan(&st, &n); err != nil {
			return nil, err
		}
		out[st] = n
	}
	return out, rows.Err()
}

// rawDigests is digests as a bytea[] parameter.
func rawDigests(digests []events.Digest) [][]byte {
	raw := make([][]byte, len(digests))
	for i := range digests {
		raw[i] = digests[i][:]
	}
	return raw
}
