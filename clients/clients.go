// Package clients keeps OAuth clients and password-grant users in Postgres
// and authenticates them for the issuer.
//
// Client secrets are 256-bit random values generated here, so a SHA-256
// digest is enough to store them: there is nothing to guess. User passwords
// are chosen by people and get bcrypt.
package clients

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/crypto/bcrypt"

	"github.com/tokenpipe/tokenpipe/events"
)

// Grants a client may be allowed.
var knownGrants = []string{"client_credentials", "password", "refresh_token"}

var (
	// ErrInvalidClient: unknown client or wrong secret (deliberately not told apart).
	ErrInvalidClient = errors.New("invalid client credentials")
	// ErrInvalidGrant: unknown user or wrong password.
	ErrInvalidGrant = errors.New("invalid resource owner credentials")
	// ErrNotFound: no such client or user to remove.
	ErrNotFound = errors.New("not found")
)

// Client is a registered OAuth client.
type Client struct {
	ID           string
	SecretDigest [sha256.Size]byte
	Scopes       []string // allowed scopes, sorted
	Grants       []string // allowed grant types, sorted
	CreatedAt    time.Time
	scopeSet     map[string]bool
}

// AllowsScope reports whether the client may request scope.
func (c *Client) AllowsScope(scope string) bool {
	if c.scopeSet == nil {
		return slices.Contains(c.Scopes, scope)
	}
	return c.scopeSet[scope]
}

// Allows reports whether the client may use grant.
func (c *Client) Allows(grant string) bool { return slices.Contains(c.Grants, grant) }

// validID accepts what fits in HTTP Basic and in our key columns.
func validID(kind, id string) error {
	if id == "" || len(id) > events.MaxClientIDLen {
		return fmt.Errorf("%s must be 1 to %d bytes", kind, events.MaxClientIDLen)
	}
	for _, r := range id {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) || r == ':' {
			return fmt.Errorf("%s %q may not contain spaces, ':' or control characters", kind, id)
		}
	}
	return nil
}

// Add registers a client and returns its secret. The secret is shown once:
// only its digest is stored.
func Add(ctx context.Context, db *pgxpool.Pool, id string, scopes, grants []string) (string, error) {
	if err := validID("client id", id); err != nil {
		return "", err
	}
	scopes = events.CanonicalScopes(strings.Join(scopes, " "))
	grants = events.CanonicalScopes(strings.Join(grants, " "))
	if len(grants) == 0 {
		return "", errors.New("at least one grant is required")
	}
	for _, g := range grants {
		if !slices.Contains(knownGrants, g) {
			return "", fmt.Errorf("grant %q is not one of %s", g, strings.Join(knownGrants, ", "))
		}
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	secret := base64.RawURLEncoding.EncodeToString(raw)
	digest := sha256.Sum256([]byte(secret))
	_, err := db.Exec(ctx, `INSERT INTO clients (client_id, secret_digest, scopes, grants) VALUES ($1, $2, $3, $4)`,
		id, digest[:], scopes, grants)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" {
		return "", fmt.Errorf("client %q already exists", id)
	}
	if err != nil {
		return "", fmt.Errorf("add client: %w", err)
	}
	return secret, nil
}

// List returns every client, without secrets.
func List(ctx context.Context, db *pgxpool.Pool) ([]Client, error) {
	rows, err := db.Query(ctx, `SELECT client_id, scopes, grants, created_at FROM clients ORDER BY client_id`)
	if err != nil {
		return nil, fmt.Errorf("list clients: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Client, error) {
		var c Client
		err := r.Scan(&c.ID, &c.Scopes, &c.Grants, &c.CreatedAt)
		return c, err
	})
}

// Remove deletes a client. Issuers stop accepting it within their cache TTL.
func Remove(ctx context.Context, db *pgxpool.Pool, id string) error {
	tag, err := db.Exec(ctx, `DELETE FROM clients WHERE client_id = $1`, id)
	if err != nil {
		return fmt.Errorf("remove client: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("client %q: %w", id, ErrNotFound)
	}
	return nil
}

// AddUser registers a password-grant user with a bcrypt hash of cost cost.
func AddUser(ctx context.Context, db *pgxpool.Pool, username, password string, cost int) error {
	if err := validID("username", username); err != nil {
		return err
	}
	if len(password) < 8 || len(password) > 72 {
		return errors.New("password must be 8 to 72 bytes (bcrypt's limit)")
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(password), cost)
	if err != nil {
		return fmt.Errorf("hash password: %w", err)
	}
	_, err = db.Exec(ctx, `INSERT INTO users (username, password_hash) VALUES ($1, $2)
		ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash`, username, string(hash))
	if err != nil {
		return fmt.Errorf("add user: %w", err)
	}
	return nil
}

// RemoveUser deletes a user.
func RemoveUser(ctx context.Context, db *pgxpool.Pool, username string) error {
	tag, err := db.Exec(ctx, `DELETE FROM users WHERE username = $1`, username)
	if err != nil {
		return fmt.Errorf("remove user: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("user %q: %w", username, ErrNotFound)
	}
	return nil
}

// Registry authenticates clients and users for the token endpoint. Clients
// are cached for TTL so the hot path does not query Postgres per request;
// a removed client keeps working on an issuer for at most TTL. While
// Postgres cannot be reached, the last known registration keeps answering.
type Registry struct {
	db       *pgxpool.Pool
	ttl      time.Duration
	maxItems int
	dummy    []byte // bcrypt hash compared when the user is unknown

	mu    sync.Mutex
	cache map[string]cached
}

type cached struct {
	client  *Client // nil: known not to exist
	expires time.Time
}

// NewRegistry returns a registry with a client cache of the given TTL.
func NewRegistry(db *pgxpool.Pool, ttl time.Duration) *Registry {
	dummy, _ := bcrypt.GenerateFromPassword([]byte("no such user, constant time"), bcrypt.DefaultCost)
	return &Registry{db: db, ttl: ttl, maxItems: 10000, dummy: dummy, cache: map[string]cached{}}
}

// dummyDigest is compared when a client is unknown, so the answer takes the
// same time whether or not the id exists.
var dummyDigest = sha256.Sum256([]byte("tokenpipe: no such client"))

// Authenticate returns the client if secret is its secret.
func (r *Registry) Authenticate(ctx context.Context, id, secret string) (*Client, error) {
	c, err := r.client(ctx, id)
	if err != nil {
		return nil, err
	}
	given := sha256.Sum256([]byte(secret))
	want := dummyDigest
	if c != nil {
		want = c.SecretDigest
	}
	if subtle.ConstantTimeCompare(given[:], want[:]) != 1 || c == nil {
		return nil, ErrInvalidClient
	}
	return c, nil
}

func (r *Registry) client(ctx context.Context, id string) (*Client, error) {
	now := time.Now()
	r.mu.Lock()
	e, known := r.cache[id]
	r.mu.Unlock()
	if known && now.Before(e.expires) {
		return e.client, nil
	}
	var c Client
	var digest []byte
	err := r.db.QueryRow(ctx, `SELECT client_id, secret_digest, scopes, grants, created_at FROM clients WHERE client_id = $1`, id).
		Scan(&c.ID, &digest, &c.Scopes, &c.Grants, &c.CreatedAt)
	var found *Client
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil && known:
		// Postgres is unreachable: keep answering with the last known
		// registration, so an async issuer rides out a database outage.
		return e.client, nil
	case err != nil:
		return nil, fmt.Errorf("look up client: %w", err)
	default:
		copy(c.SecretDigest[:], digest)
		// A set, not a scan: a client may be allowed thousands of scopes
		// and every request checks each one it asks for.
		c.scopeSet = make(map[string]bool, len(c.Scopes))
		for _, sc := range c.Scopes {
			c.scopeSet[sc] = true
		}
		found = &c
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cache) >= r.maxItems {
		// Bounded: drop everything rather than track recency; a refill
		// costs one query per client.
		clear(r.cache)
	}
	r.cache[id] = cached{client: found, expires: now.Add(r.ttl)}
	return found, nil
}

// VerifyUser checks a resource owner's password.
func (r *Registry) VerifyUser(ctx context.Context, username, password string) error {
	var hash string
	err := r.db.QueryRow(ctx, `SELECT password_hash FROM users WHERE username = $1`, username).Scan(&hash)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		_ = bcrypt.CompareHashAndPassword(r.dummy, []byte(password))
		return ErrInvalidGrant
	case err != nil:
		return fmt.Errorf("look up user: %w", err)
	}
	if bcrypt.CompareHashAndPassword([]byte(hash), []byte(password)) != nil {
		return ErrInvalidGrant
	}
	return nil
}
